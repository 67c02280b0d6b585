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

Cost per request: one transaction (``record_request``) whose reads do not grow with the
user's traffic: the near-duplicate, refusal and close-population counts are index range
counts (populations: the two ranges just below and above), and the cells of the last hour
are per-minute sums (``guard_cells``, kept in step with
``guard_requests`` in the same transaction) plus the rows of the one minute the window
starts in. Rows older than twice the longest window, which no counter reads, are purged
(in whole minutes) at most once a minute per connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable

from sekisho.instance import Instance, secure

PURGE_EVERY_S = 60.0
BUCKET_S = 60   # guard_cells: cells per user and minute

_connections = threading.local()
_setup_lock = threading.Lock()
SETUP_TIMEOUT_S = 30

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS guard_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        fingerprint TEXT NOT NULL, refused INTEGER NOT NULL, cells INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS guard_requests_user_ts ON guard_requests(user, ts)",
    "CREATE INDEX IF NOT EXISTS guard_requests_user_fp_ts ON guard_requests(user, fingerprint, ts)",
    "CREATE INDEX IF NOT EXISTS guard_requests_refused ON guard_requests(user, ts) WHERE refused = 1",
    """CREATE TABLE IF NOT EXISTS guard_populations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        population INTEGER NOT NULL, fingerprint TEXT NOT NULL)""",
    # close populations are two index ranges (below and above), never the user's whole window
    "CREATE INDEX IF NOT EXISTS guard_populations_user_pop_ts ON guard_populations(user, population, ts)",
    "DROP INDEX IF EXISTS guard_populations_user_ts",
)
_COUNTERS = """SELECT
    (SELECT COUNT(*) FROM guard_requests WHERE user = ? AND fingerprint = ? AND ts > ?),
    (SELECT COUNT(*) FROM guard_requests WHERE user = ? AND refused = 1 AND ts > ?),
    (SELECT COALESCE(SUM(cells), 0) FROM guard_cells WHERE user = ? AND minute > ?)
    + (SELECT COALESCE(SUM(cells), 0) FROM guard_requests WHERE user = ? AND ts > ? AND ts < ?)"""
_CELLS_TABLE = """CREATE TABLE guard_cells (
    user TEXT NOT NULL, minute INTEGER NOT NULL, cells INTEGER NOT NULL,
    PRIMARY KEY (user, minute)) WITHOUT ROWID"""


def _minute(ts: float) -> int:
    """The bucket m with m*60 <= ts < (m+1)*60, decided by exact comparisons (m*60 is an
    exact float), so a bucket holds exactly the rows a ``ts`` range selects."""
    m = int(ts // BUCKET_S)
    if m * BUCKET_S > ts:
        m -= 1
    elif (m + 1) * BUCKET_S <= ts:
        m += 1
    return m


class _State:
    """This thread's connection to one state file, and when it last purged each table."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con
        self.purged_at: dict[str, float] = {}

    def purge_due(self, table: str, now: float) -> bool:
        last = self.purged_at.get(table)
        return last is None or abs(now - last) >= PURGE_EVERY_S


def _state(instance: Instance) -> _State:
    """One connection per thread and state file (counters need no per-request fsync:
    synchronous=NORMAL in WAL mode loses at most the last requests on power failure)."""
    cache = getattr(_connections, "by_path", None)
    if cache is None:
        cache = _connections.by_path = {}
    path = instance.state_path
    state = cache.get(str(path))
    if state is not None:
        return state
    new = not path.exists()
    # switching a new file to WAL takes an exclusive lock without waiting on the busy
    # timeout, so threads (and processes) opening the file at once retry here
    with _setup_lock:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                con.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            con.execute(statement)
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'guard_cells'").fetchone() is None:
            # a state file from before the per-minute sums: build them from the rows kept
            con.execute(_CELLS_TABLE)
            sums: dict[tuple[str, int], int] = {}
            for user, ts, cells in con.execute("SELECT user, ts, cells FROM guard_requests").fetchall():
                key = (user, _minute(ts))
                sums[key] = sums.get(key, 0) + int(cells)
            con.executemany("INSERT INTO guard_cells(user, minute, cells) VALUES (?, ?, ?)",
                            [(u, m, c) for (u, m), c in sums.items()])
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        con.close()
        raise
    if new:
        secure(path)
    state = cache[str(path)] = _State(con)
    return state


def _connect(instance: Instance) -> sqlite3.Connection:
    return _state(instance).con


def _close_count(con: sqlite3.Connection, user: str, since: float, population: int, k: int) -> int:
    """Recent populations of the user differing from ``population`` by 1..k-1
    (|q - p| < k and q != p, as the two open ranges p-k < q < p and p < q < p+k)."""
    return con.execute(
        "SELECT (SELECT COUNT(*) FROM guard_populations WHERE user = ? AND population > ? AND population < ? "
        "AND ts > ?) + (SELECT COUNT(*) FROM guard_populations WHERE user = ? AND population > ? "
        "AND population < ? AND ts > ?)",
        (user, population - k, population, since, user, population, population + k, since)).fetchone()[0]


def _differencing(alerts, fingerprint: str) -> dict:
    return {"alert": "differencing", "window_s": alerts.near_duplicate_window_s, "fingerprint": fingerprint}


def record_request(instance: Instance, alerts, *, user: str, fingerprint: str, refused: bool, cells: int,
                   populations: Iterable[int] = (), k: int | None = None,
                   now: float | None = None) -> list[dict]:
    """Record one request and the populations of its filtered parts, in one transaction;
    return the alerts it triggers (each a dict for the audit): the counter alerts, then
    ``differencing`` for a population that forms the first close pair in the window."""
    now = time.time() if now is None else now
    populations = [int(p) for p in populations]
    if populations and k is None:
        raise ValueError("populations need k")
    state = _state(instance)
    con = state.con
    horizon = max(3600, alerts.near_duplicate_window_s, alerts.refusal_window_s)
    pop_horizon = max(3600, alerts.near_duplicate_window_s)
    purge_requests = state.purge_due("guard_requests", now)
    purge_populations = bool(populations) and state.purge_due("guard_populations", now)
    close_counts: list[int] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute("INSERT INTO guard_requests(user, ts, fingerprint, refused, cells) VALUES (?, ?, ?, ?, ?)",
                    (user, now, fingerprint, int(refused), int(cells)))
        con.execute("INSERT INTO guard_cells(user, minute, cells) VALUES (?, ?, ?) "
                    "ON CONFLICT(user, minute) DO UPDATE SET cells = cells + excluded.cells",
                    (user, _minute(now), int(cells)))
        # the cells of rows with ts > now - 3600 are the whole minutes after the one the
        # window starts in, plus that minute's rows inside the window
        start = now - 3600
        first = _minute(start)
        dup, ref, bulk = con.execute(_COUNTERS, (
            user, fingerprint, now - alerts.near_duplicate_window_s, user, now - alerts.refusal_window_s,
            user, first, user, start, (first + 1) * BUCKET_S)).fetchone()
        for population in populations:
            close_counts.append(_close_count(con, user, now - alerts.near_duplicate_window_s, population, int(k)))
            con.execute("INSERT INTO guard_populations(user, ts, population, fingerprint) VALUES (?, ?, ?, ?)",
                        (user, now, population, fingerprint))
        # keep the tables small: nothing older than the longest window is ever counted
        if purge_requests:   # whole minutes, so guard_cells keeps summing exactly the rows kept
            cutoff = _minute(now - 2 * horizon)
            con.execute("DELETE FROM guard_requests WHERE ts < ?", (cutoff * BUCKET_S,))
            con.execute("DELETE FROM guard_cells WHERE minute < ?", (cutoff,))
        if purge_populations:
            con.execute("DELETE FROM guard_populations WHERE ts < ?", (now - 2 * pop_horizon,))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    if purge_requests:
        state.purged_at["guard_requests"] = now
    if purge_populations:
        state.purged_at["guard_populations"] = now
    bulk_before = bulk - int(cells)
    found: list[dict] = []
    if dup == alerts.near_duplicate_burst:
        found.append({"alert": "near_duplicate", "count": dup, "window_s": alerts.near_duplicate_window_s,
                      "fingerprint": fingerprint})
    if refused and ref == alerts.refusal_burst:
        found.append({"alert": "refusals", "count": ref, "window_s": alerts.refusal_window_s})
    if bulk_before < alerts.bulk_cells_per_hour <= bulk:
        found.append({"alert": "bulk", "cells_last_hour": bulk, "threshold": alerts.bulk_cells_per_hour})
    for close in close_counts:
        if close == 1:  # the first pair in the window; later ones are part of the same episode
            found.append(_differencing(alerts, fingerprint))
    return found
