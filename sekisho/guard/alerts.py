"""Probing and bulk-volume alerts. Counters live in ``state.sqlite`` so they survive
restarts and are shared by every process serving queries.

* ``bulk``: cells returned by a user within the last hour above ``bulk_cells_per_hour``;
* ``near_duplicate``: queries with the same fingerprint (literals masked) within
  ``near_duplicate_window_s`` reaching ``near_duplicate_burst`` — the shape of
  differencing, tracker and averaging attacks;
* ``refusals``: refusals within ``refusal_window_s`` reaching ``refusal_burst``.

* ``differencing``: two filtered queries by the same user within
  ``near_duplicate_window_s`` whose populations differ by fewer than k persons (but not 0)
  — the signature of a differencing pair; the analyst sees no difference in the answer
  (the populations are kept in ``state.sqlite`` only, never returned).

An alert is raised when a counter first reaches its threshold inside the window (not on
every later request), and audited as type ``alert``.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from sekisho.instance import Instance, secure


_connections = threading.local()


def _connect(instance: Instance) -> sqlite3.Connection:
    """One connection per thread and state file (counters need no per-request fsync:
    synchronous=NORMAL in WAL mode loses at most the last requests on power failure)."""
    cache = getattr(_connections, "by_path", None)
    if cache is None:
        cache = _connections.by_path = {}
    path = instance.state_path
    con = cache.get(str(path))
    if con is not None:
        return con
    new = not path.exists()
    con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("""CREATE TABLE IF NOT EXISTS guard_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        fingerprint TEXT NOT NULL, refused INTEGER NOT NULL, cells INTEGER NOT NULL)""")
    con.execute("CREATE INDEX IF NOT EXISTS guard_requests_user_ts ON guard_requests(user, ts)")
    con.execute("""CREATE TABLE IF NOT EXISTS guard_populations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        population INTEGER NOT NULL, fingerprint TEXT NOT NULL)""")
    con.execute("CREATE INDEX IF NOT EXISTS guard_populations_user_ts ON guard_populations(user, ts)")
    if new:
        secure(path)
    cache[str(path)] = con
    return con


def record_and_check(instance: Instance, alerts, *, user: str, fingerprint: str, refused: bool,
                     cells: int, now: float | None = None) -> list[dict]:
    """Record one request; return the alerts it triggers (each a dict for the audit)."""
    now = time.time() if now is None else now
    found: list[dict] = []
    con = _connect(instance)
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute("INSERT INTO guard_requests(user, ts, fingerprint, refused, cells) VALUES (?, ?, ?, ?, ?)",
                    (user, now, fingerprint, int(refused), int(cells)))
        dup = con.execute("SELECT COUNT(*) FROM guard_requests WHERE user = ? AND fingerprint = ? AND ts > ?",
                          (user, fingerprint, now - alerts.near_duplicate_window_s)).fetchone()[0]
        ref = con.execute("SELECT COUNT(*) FROM guard_requests WHERE user = ? AND refused = 1 AND ts > ?",
                          (user, now - alerts.refusal_window_s)).fetchone()[0]
        bulk_before, bulk = con.execute(
            "SELECT COALESCE(SUM(cells), 0) - ?, COALESCE(SUM(cells), 0) FROM guard_requests "
            "WHERE user = ? AND ts > ?", (int(cells), user, now - 3600)).fetchone()
        # keep the table small: nothing older than the longest window matters
        horizon = max(3600, alerts.near_duplicate_window_s, alerts.refusal_window_s)
        con.execute("DELETE FROM guard_requests WHERE ts < ?", (now - 2 * horizon,))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    if dup == alerts.near_duplicate_burst:
        found.append({"alert": "near_duplicate", "count": dup, "window_s": alerts.near_duplicate_window_s,
                      "fingerprint": fingerprint})
    if refused and ref == alerts.refusal_burst:
        found.append({"alert": "refusals", "count": ref, "window_s": alerts.refusal_window_s})
    if bulk_before < alerts.bulk_cells_per_hour <= bulk:
        found.append({"alert": "bulk", "cells_last_hour": bulk, "threshold": alerts.bulk_cells_per_hour})
    return found


def record_population(instance: Instance, alerts, *, user: str, population: int, fingerprint: str, k: int,
                      now: float | None = None) -> list[dict]:
    """Record the population of a filtered query; alert when a recent one differs by 1..k-1."""
    now = time.time() if now is None else now
    con = _connect(instance)
    con.execute("BEGIN IMMEDIATE")
    try:
        close = con.execute(
            "SELECT COUNT(*) FROM guard_populations WHERE user = ? AND ts > ? AND population <> ? "
            "AND ABS(population - ?) < ?",
            (user, now - alerts.near_duplicate_window_s, int(population), int(population), int(k))).fetchone()[0]
        con.execute("INSERT INTO guard_populations(user, ts, population, fingerprint) VALUES (?, ?, ?, ?)",
                    (user, now, int(population), fingerprint))
        con.execute("DELETE FROM guard_populations WHERE ts < ?", (now - 2 * max(3600, alerts.near_duplicate_window_s),))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    if close == 1:  # the first pair in the window; later ones are part of the same episode
        return [{"alert": "differencing", "window_s": alerts.near_duplicate_window_s, "fingerprint": fingerprint}]
    return []
