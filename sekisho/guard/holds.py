"""Holds: an analyst paused until an admin has reviewed the alert that paused them.

``hold_of`` is read (one primary-key read) before every query of the user;
``alerts.record_request`` writes a hold in the transaction that raises a paused alert;
``resume`` lifts it and forgets the user's recorded populations, so a continued attack
pauses them again.
"""

from __future__ import annotations

import time

from sekisho.guard.alert_state import connect as _connect
from sekisho.instance import Instance

def _hold(row) -> dict:
    user, since, alert, raised_by = row
    return {"user": user, "since": since, "alert": alert, "raised_by": raised_by}


def hold_of(instance: Instance, user: str) -> dict | None:
    """``user``'s hold (since, alert, raised_by) or None: one primary-key read, made
    before every query of the user."""
    row = _connect(instance).execute("SELECT user, since, alert, raised_by FROM guard_holds WHERE user = ?",
                                     (user,)).fetchone()
    return None if row is None else _hold(row)


def holds(instance: Instance) -> list[dict]:
    """Every user on hold, oldest first."""
    return [_hold(r) for r in _connect(instance).execute(
        "SELECT user, since, alert, raised_by FROM guard_holds ORDER BY since, user").fetchall()]


def put_hold(instance: Instance, user: str, *, alert: str, raised_by: int | None = None,
             since: float | None = None) -> None:
    """Put ``user`` on hold (keeps an existing hold; used to undo a resume that could not
    be audited)."""
    _connect(instance).execute("INSERT INTO guard_holds(user, since, alert, raised_by) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT(user) DO NOTHING",
                               (user, time.time() if since is None else since, alert, raised_by))


def resume(instance: Instance, user: str) -> dict | None:
    """Lift ``user``'s hold and return it (None if there was none). The populations,
    decompositions and cell releases recorded for the user are forgotten with it: the reviewed episode is
    closed, and an attack that goes on raises its alert (and the hold) again."""
    con = _connect(instance)
    con.execute("BEGIN IMMEDIATE")
    try:
        row = con.execute("SELECT user, since, alert, raised_by FROM guard_holds WHERE user = ?",
                          (user,)).fetchone()
        if row is not None:
            con.execute("DELETE FROM guard_holds WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_populations WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_decompositions WHERE user = ?", (user,))
            # the pairs across uploads, not the populations: a continued attack pairs again
            con.execute("DELETE FROM guard_upload_pairs WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_region_checks WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_cell_releases WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_cell_pairs WHERE user = ?", (user,))
            con.execute("DELETE FROM guard_cell_pending WHERE user = ?", (user,))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    return None if row is None else _hold(row)
