"""The alerts' state in ``state.sqlite``: the tables the counters read, one connection
per thread and file, the schema and its migrations from older state files.

Kept apart from the rules (``alerts``) and the holds (``holds``), which both write to it
in their own transactions.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from sekisho.instance import Instance, secure

_POPULATION_COLUMNS = (("snapshot", "TEXT"), ("row_sql", "TEXT"), ("paired", "INTEGER NOT NULL DEFAULT 0"))
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
    # snapshot, row_sql: what defines the population (differencing pairs are verified on
    # the store); paired: part of a verified differencing pair (one alert per episode)
    """CREATE TABLE IF NOT EXISTS guard_populations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        population INTEGER NOT NULL, fingerprint TEXT NOT NULL,
        snapshot TEXT, row_sql TEXT, paired INTEGER NOT NULL DEFAULT 0)""",
    # close populations are two index ranges (below and above), never the user's whole window
    "CREATE INDEX IF NOT EXISTS guard_populations_user_pop_ts ON guard_populations(user, population, ts)",
    "DROP INDEX IF EXISTS guard_populations_user_ts",
    # decomposition: one row per (user, population identity, query shape), the last time
    # that shape released it; the shapes of one identity in the window are an index range
    """CREATE TABLE IF NOT EXISTS guard_decompositions (
        user TEXT NOT NULL, population INTEGER NOT NULL, pkey INTEGER NOT NULL, shape TEXT NOT NULL,
        ts REAL NOT NULL, PRIMARY KEY (user, population, pkey, shape)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guard_decompositions_identity_ts ON guard_decompositions(user, population, pkey, ts)",
    # upload_differencing: the user's populations with their definition, one row per
    # (snapshot, row SQL), kept for the alert's window (an upload cycle, not an hour) ...
    """CREATE TABLE IF NOT EXISTS guard_upload_populations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        population INTEGER NOT NULL, snapshot TEXT NOT NULL, row_sql TEXT NOT NULL)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS guard_upload_populations_definition "
    "ON guard_upload_populations(user, snapshot, row_sql)",
    "CREATE INDEX IF NOT EXISTS guard_upload_populations_user_pop ON guard_upload_populations(user, population)",
    # ... and the pairs across snapshots verified on the store (counted per user in the window)
    """CREATE TABLE IF NOT EXISTS guard_upload_pairs (
        user TEXT NOT NULL, new_id INTEGER NOT NULL, old_id INTEGER NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (user, new_id, old_id)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guard_upload_pairs_user_ts ON guard_upload_pairs(user, ts)",
    # differencing per cell (``cell_pairs``): each release's cells of k or more (a digest),
    # one row per (user, snapshot, row SQL); the confirmed pairs (one alert per episode)
    """CREATE TABLE IF NOT EXISTS guard_cell_releases (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, snapshot TEXT NOT NULL, shape TEXT NOT NULL,
        keys INTEGER NOT NULL, row_sql TEXT NOT NULL, cells BLOB NOT NULL, ts REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS guard_cell_releases_class ON guard_cell_releases(user, snapshot, shape, keys, id)",
    "CREATE INDEX IF NOT EXISTS guard_cell_releases_ts ON guard_cell_releases(ts)",
    """CREATE TABLE IF NOT EXISTS guard_cell_pairs (
        user TEXT NOT NULL, old_id INTEGER NOT NULL, cells INTEGER NOT NULL, ts REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS guard_cell_pairs_user_ts ON guard_cell_pairs(user, ts)",
    # ... and the candidate pairs a request had no store check left for, checked first by
    # the user's next requests (``cell_checks.check_releases``; too many: an alert)
    """CREATE TABLE IF NOT EXISTS guard_cell_pending (
        user TEXT NOT NULL, pair TEXT NOT NULL, snapshot TEXT NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (user, pair)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guard_cell_pending_user_ts ON guard_cell_pending(user, ts)",
    # upload_decomposition (``upload_regions``): the partitions of region classes a user
    # released per snapshot, with their weight (a class's partitions are an index range) ...
    """CREATE TABLE IF NOT EXISTS guard_region_partitions (
        user TEXT NOT NULL, class TEXT NOT NULL, snapshot TEXT NOT NULL, partition TEXT NOT NULL,
        weight REAL NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (user, class, snapshot, partition)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guard_region_partitions_ts ON guard_region_partitions(ts)",
    # ... its pieces (dropped ranges: boxes), weighed per family by their depth ...
    """CREATE TABLE IF NOT EXISTS guard_region_pieces (
        user TEXT NOT NULL, class TEXT NOT NULL, snapshot TEXT NOT NULL, family TEXT NOT NULL,
        piece TEXT NOT NULL, factor REAL NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (user, class, snapshot, family, piece)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guard_region_pieces_ts ON guard_region_pieces(ts)",
    # ... and the classes checked on the store across two snapshots (changed: some region
    # of the class gained or lost 1..k-1 contributors between them)
    """CREATE TABLE IF NOT EXISTS guard_region_checks (
        user TEXT NOT NULL, class TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL,
        changed INTEGER NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (user, class, old, new)) WITHOUT ROWID""",
    # users on hold: read (by primary key) before every query of the user
    """CREATE TABLE IF NOT EXISTS guard_holds (
        user TEXT PRIMARY KEY, since REAL NOT NULL, alert TEXT NOT NULL, raised_by INTEGER) WITHOUT ROWID""",
)
_CELLS_TABLE = """CREATE TABLE guard_cells (
    user TEXT NOT NULL, minute INTEGER NOT NULL, cells INTEGER NOT NULL,
    PRIMARY KEY (user, minute)) WITHOUT ROWID"""


def minute_of(ts: float) -> int:
    """The bucket m with m*60 <= ts < (m+1)*60, decided by exact comparisons (m*60 is an
    exact float), so a bucket holds exactly the rows a ``ts`` range selects."""
    m = int(ts // BUCKET_S)
    if m * BUCKET_S > ts:
        m -= 1
    elif (m + 1) * BUCKET_S <= ts:
        m += 1
    return m


class State:
    """This thread's connection to one state file, and when it last purged each table."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con
        self.purged_at: dict[str, float] = {}

    def purge_due(self, table: str, now: float) -> bool:
        last = self.purged_at.get(table)
        return last is None or abs(now - last) >= PURGE_EVERY_S


def state_of(instance: Instance) -> State:
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
        have = {row[1] for row in con.execute("PRAGMA table_info(guard_populations)").fetchall()}
        for column, decl in _POPULATION_COLUMNS:   # a state file from before the definitions
            if column not in have:
                con.execute(f"ALTER TABLE guard_populations ADD COLUMN {column} {decl}")
        con.execute("CREATE INDEX IF NOT EXISTS guard_populations_paired ON guard_populations(user, ts) "
                    "WHERE paired = 1")
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'guard_cells'").fetchone() is None:
            # a state file from before the per-minute sums: build them from the rows kept
            con.execute(_CELLS_TABLE)
            sums: dict[tuple[str, int], int] = {}
            for user, ts, cells in con.execute("SELECT user, ts, cells FROM guard_requests").fetchall():
                key = (user, minute_of(ts))
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
    state = cache[str(path)] = State(con)
    return state


def connect(instance: Instance) -> sqlite3.Connection:
    return state_of(instance).con
