"""The store checks of a request's candidate cell pairs (``cell_pairs``): which are
dropped by their sketches, which are checked now, which wait for the user's next
requests, and the alert when too many wait.

Why a budget: a check is two scans of the row SELECTs, on the bookkeeping thread; a
request checks at most ``cell_pairs.MAX_CHECKS`` new pairs per release. Why waiting
pairs: with the rest dropped, ``MAX_CHECKS`` nested-looking decoys asked between the two
halves of a pair (releases of the family, close, moved one way, not nested on the store)
took the second half's checks and hid the pair for good. Now it waits in
``guard_cell_pending`` and the next request checks it first, on a budget of its own.
Why sketches first (``cell_sketches``): a pair whose sketches show that neither
release's persons are all in the other's cannot be confirmed and needs no check — the
decoys above are dropped so, and so are the dozens of candidates of a sweep over
overlapping sets (the same table for many sets of 丁目), which otherwise waited until
the analyst was held (``unchecked``) for pairs that could never be confirmed.

Cost: one sketch scan per new release in a candidate pair; a store check only for pairs
the sketches cannot rule out (nested, or not sketched: more than ``MAX_SKETCHES``
releases to count in one request, after a restart).
"""

from __future__ import annotations

import hashlib
import json
import time

import sqlglot

from sekisho.guard import cell_sketches
from sekisho.guard.alert_state import state_of as _state
from sekisho.guard.alerts import _pause, _transaction
from sekisho.guard.cell_pairs import (_CHECKED, MAX_CHECKS, CellPair, confirm, differing, digest, family,
                                     in_episode, record)
from sekisho.instance import Instance


def check_releases(instance: Instance, disclosure, released_rows, *, user: str, fingerprint: str, cursor,
                   current: str | None, raised_by: int | None, pause: bool) -> tuple[list[dict], Exception | None]:
    """Record a request's releases (``(snapshot, row SQL, keys, cells, tree)``), check the
    candidate pairs on the store (``cursor(snapshot)``: a context manager giving a DuckDB
    cursor on that snapshot), and confirm those that differ: (alerts, first store error).
    Releases of a snapshot no longer ``current`` are not recorded (their pairs would need
    the old snapshot opened; an upload replaced it before the bookkeeping ran).

    A request checks at most ``MAX_CHECKS`` new pairs per release: the pairs left over
    (decoys asked between the two halves of a pair take the checks) wait in
    ``guard_cell_pending``, and each later request of the user checks up to
    ``MAX_CHECKS`` of them, oldest first, besides its own; more than ``MAX_PENDING``
    waiting raise ``differencing`` (level ``unchecked``). So no candidate goes unchecked:
    decoys the sketches cannot rule out delay the alert by a request, and more of them
    than the checks can follow raise it. Pairs whose sketches (``cell_sketches``; the request's releases and those
    they pair with, at most ``MAX_SKETCHES`` counted per request) rule out nesting take
    no check and never wait. Within an open episode (the alert raised, within its
    window) nothing is checked: no pair could raise it again; the alert comes again
    once the window has passed."""
    k, alerts = disclosure.k, disclosure.alerts
    # within an episode no pair can raise the alert again: record, check nothing
    quiet = in_episode(_state(instance).con, alerts, user, time.time())
    queue: list[tuple[str, CellPair, bool]] = [] if quiet else \
        [(snapshot, pair, True) for snapshot, pair in _waiting(instance, user)]
    releases = 0
    for snapshot, row_sql, keys, cells, tree in released_rows:
        blob = digest(cells, keys, k) if snapshot == current else None
        if blob is None:
            continue
        tree = tree if tree is not None else sqlglot.parse_one(row_sql, read="duckdb")
        releases += 1
        queue += [(snapshot, pair, False) for pair in record(instance, alerts, user=user, snapshot=snapshot,
                                                             shape=family(tree), keys=keys, row_sql=row_sql,
                                                             cells=blob, k=k)]
    if quiet:
        _state(instance).con.execute("DELETE FROM guard_cell_pending WHERE user = ?", (user,))
        return [], None
    failure = _sketch([(snapshot, pair, waited) for snapshot, pair, waited in queue
                       if _CHECKED.get(_seen(user, snapshot, k, pair)) is None], cursor)
    verified, done, deferred = [], [], []
    # the waiting pairs and the new ones have budgets of their own: an ordinary run of
    # related queries drains what waits, decoys only push the pair to the next request
    checks, budget = {True: 0, False: 0}, {True: MAX_CHECKS, False: MAX_CHECKS * releases}
    for snapshot, pair, waited in queue:
        # a pair checked before (an analyst re-running a notebook) is not read again
        # and takes none of the request's checks
        seen = _seen(user, snapshot, k, pair)
        cells = _CHECKED.get(seen)
        if cells is None and not _may_be_nested(snapshot, pair):
            cells = 0   # no store check: the sketches say neither holds the other
        if cells is None:
            if checks[waited] >= budget[waited]:
                if not waited:
                    deferred.append((snapshot, pair))
                continue
            checks[waited] += 1
            try:
                with cursor(snapshot) as cur:
                    cells = differing(cur, pair, k)
            except Exception as exc:   # store errors (a pruned snapshot, ...): audited, no alert
                failure = failure or exc
                if waited:
                    done.append(pair)   # (the snapshot is gone: it cannot be checked again)
                continue
            _CHECKED.put(seen, cells)
        if waited:
            done.append(pair)
        if cells:
            verified.append((pair, cells))
    found = confirm(instance, alerts, user=user, fingerprint=fingerprint, verified=verified, raised_by=raised_by,
                    pause=pause)
    found += _wait(instance, alerts, user=user, fingerprint=fingerprint, done=done, deferred=deferred,
                   raised_by=raised_by, pause=pause)
    return found, failure


def _seen(user: str, snapshot: str, k: int, pair: CellPair) -> bytes:
    return hashlib.blake2b(repr((user, snapshot, k, pair[:2], pair[2:4], pair[5:])).encode(), digest_size=16).digest()


def _may_be_nested(snapshot: str, pair: CellPair) -> bool:
    a, b = cell_sketches.known(snapshot, pair.new_sql), cell_sketches.known(snapshot, pair.old_sql)
    return a is None or b is None or cell_sketches.can_be_nested(a, b)


def _sketch(queue: list[tuple[str, CellPair, bool]], cursor) -> Exception | None:
    """Count the sketches (``cell_sketches``) the queue's pairs lack — the request's own
    releases first (they are in all its new pairs), at most ``MAX_SKETCHES``, one
    statement per snapshot: (the first store error)."""
    wanted: dict[str, list[str]] = {}
    room = cell_sketches.MAX_SKETCHES
    own = [(s, p.new_sql) for s, p, waited in queue if not waited]
    rest = [(s, sql) for s, p, _ in queue for sql in (p.new_sql, p.old_sql)]
    for snapshot, sql in own + rest:
        if room and cell_sketches.known(snapshot, sql) is None and sql not in wanted.get(snapshot, ()):
            wanted.setdefault(snapshot, []).append(sql)
            room -= 1
    failure = None
    for snapshot, sqls in wanted.items():
        try:
            with cursor(snapshot) as cur:
                cell_sketches.count(cur, snapshot, sqls)
        except Exception as exc:   # the pairs are then checked on the store, or wait
            failure = failure or exc
    return failure


MAX_PENDING = 24     # candidate pairs waiting for a check, per user, before ``differencing`` (unchecked)


def _pair_text(pair: CellPair) -> str:
    return json.dumps(list(pair), ensure_ascii=False)


def _waiting(instance: Instance, user: str) -> list[tuple[str, CellPair]]:
    """The user's pairs waiting for a store check, oldest first."""
    rows = _state(instance).con.execute("SELECT snapshot, pair FROM guard_cell_pending WHERE user = ? "
                                        "ORDER BY ts, pair", (user,)).fetchall()
    out = []
    for snapshot, text in rows:
        new_sql, old_sql, new_keys, old_keys, *rest = json.loads(text)
        out.append((snapshot, CellPair(new_sql, old_sql, tuple(new_keys), tuple(old_keys), *rest)))
    return out


def _wait(instance: Instance, alerts, *, user: str, fingerprint: str, done: list[CellPair],
          deferred: list[tuple[str, CellPair]], raised_by: int | None, pause: bool,
          now: float | None = None) -> list[dict]:
    """Drop the waiting pairs now checked, add those deferred; when more than
    ``MAX_PENDING`` wait, return ``[differencing]`` (level ``unchecked``) if it opens an
    episode, holding the user if the policy pauses (one transaction)."""
    if not done and not deferred:
        return []
    now = time.time() if now is None else now
    con = _state(instance).con
    found: list[dict] = []
    with _transaction(con):
        con.executemany("DELETE FROM guard_cell_pending WHERE user = ? AND pair = ?",
                        [(user, _pair_text(pair)) for pair in done])
        con.executemany("INSERT INTO guard_cell_pending(user, pair, snapshot, ts) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(user, pair) DO NOTHING",
                        [(user, _pair_text(pair), snapshot, now) for snapshot, pair in deferred])
        con.execute("DELETE FROM guard_cell_pending WHERE user = ? AND ts < ?",
                    (user, now - alerts.differencing_window_s))
        (waiting,) = con.execute("SELECT COUNT(*) FROM guard_cell_pending WHERE user = ?", (user,)).fetchone()
        if waiting > MAX_PENDING:
            if not in_episode(con, alerts, user, now):
                con.execute("INSERT INTO guard_cell_pairs(user, old_id, cells, ts) VALUES (?, -1, 0, ?)",
                            (user, now))
                alert = {"alert": "differencing", "level": "unchecked", "pending": int(waiting),
                         "window_s": alerts.differencing_window_s, "fingerprint": fingerprint}
                _pause(con, alerts, alert, user=user, now=now, raised_by=raised_by, pause=pause)
                found.append(alert)
    return found
