"""Stage 5 of a query: execution — the snapshot a query runs on, SQL run on it, and
post-processing on protected tables.

* ``Snapshots`` resolves the store's current snapshot and keeps one read-only connection
  to it (an upload switches to the new one; queries already running keep the old one).
* ``Snapshot`` is that connection plus what the guard caches about the snapshot: its
  tables' types, which views hold one row per person, public views, its own cell-key
  table, and per-thread prepared statements (per user: a shared one is a timing channel).
* ``fetch`` runs guard-written SQL and returns cells; an engine error becomes a refusal
  whose text cannot carry a data value (``execution_refusal``).
* ``PostProcessor`` runs everything above the boundaries in a sealed in-memory DuckDB
  holding only protected tables and public views.
"""

from __future__ import annotations

import itertools
import threading

import duckdb
import numpy as np
import pyarrow as pa

from sekisho.guard import hidden
from sekisho.guard.catalog import Catalog, arrow_type
from sekisho.guard.errors import QueryRefused
from sekisho.guard.limits import WATCHDOG, Limits, configure
from sekisho.guard.lru import SizedLRU
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.threshold import COUNT_KINDS, Cells, cells_from_arrow
from sekisho.guard.rewrite import BoundaryPlan, Plan
from sekisho.policy import Policy
from sekisho.store import Store, StoreError

PREPARED_PER_THREAD = 256   # DuckDB prepared statements kept per thread and snapshot (all users)
# ... and their estimated memory (a prepared statement holds DuckDB's bound plan, estimated
# from its SQL's length)
PREPARED_BYTES_PER_THREAD = 32 * 2 ** 20
PREPARED_BYTES_PER_CHAR = 64
# Rows per Arrow batch when the guard fetches from DuckDB: one DuckDB vector (2,048 rows)
# rather than DuckDB's default (benchmarks/guard_overhead.py compares both).
ARROW_BATCH_ROWS = 2048


_warm_lock = threading.Lock()
_warmed = False


def warm_up() -> None:
    """Once per process, the libraries' one-off costs that would otherwise fall on the
    first query a guard answers (measured on the 530k benchmark: its first cold query took
    170-220 ms for a 5 ms scan): pyarrow imports pandas at the first ``to_numpy``
    (``cells_from_arrow``; 200+ ms), and DuckDB's first scan of a registered Arrow table
    loads pyarrow modules (post-processing; about 20 ms). Touches no data."""
    global _warmed
    with _warm_lock:
        if _warmed:
            return
        pa.array([0], type=pa.int64()).to_numpy(zero_copy_only=False)
        con = duckdb.connect(":memory:", config={"enable_external_access": False,
                                                 "autoload_known_extensions": False,
                                                 "autoinstall_known_extensions": False})
        try:
            con.register("__warm", pa.table({"x": pa.array([0], type=pa.int64())}))
            con.execute("SELECT x FROM __warm").to_arrow_table(ARROW_BATCH_ROWS)
        finally:
            con.close()
        _warmed = True


def execution_refusal(exc: Exception) -> QueryRefused:
    """Binder errors are decided from the SQL and the schema before any row is read, so
    their message may be shown; anything raised while executing (conversion, overflow,
    ...) may quote a data value and is withheld."""
    if isinstance(exc, (duckdb.InterruptException, duckdb.OutOfMemoryException)):
        return QueryRefused("resource_limit")   # time or memory: one code whatever the cause
    if isinstance(exc, (duckdb.BinderException, duckdb.ParserException, duckdb.CatalogException)):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return QueryRefused("execution_failed", part=first[:200])
    return QueryRefused("execution_failed")


class Snapshot:
    """The read-only connection to one snapshot plus what the guard caches about it."""

    def __init__(self, sid: str, backend, ptable: PerturbationTable, limits: Limits,
                 person_unique: dict[str, bool] | None = None):
        self.id = sid
        self.backend = backend
        # this snapshot's own cell-key table: every threshold answer, population check and
        # condition-influence verdict on this snapshot uses it (consistent within the
        # snapshot, a fresh draw after an upload; see sekisho.guard.protect.cellkey)
        self.ptable = ptable
        self.con: duckdb.DuckDBPyConnection = backend.con
        configure(self.con, limits)   # cursors share the database's settings
        self.lock = threading.Lock()
        self._local = threading.local()   # this thread's cursor and its prepared statements
        self._names = itertools.count()
        self.types: dict[str, dict[str, str]] = {}
        # one row per person or not, per view: as the ingest recorded it, else counted once
        self.person_unique: dict[str, bool] = dict(person_unique or {})
        self.public: dict[str, pa.Table] = {}
        for (name,) in self.con.execute("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main'").fetchall():
            self.types[name] = {c: t for c, t, *_ in self.con.execute(f'DESCRIBE "{name}"').fetchall()}

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self.con.cursor()

    def execute_prepared(self, sql: str, user: str, deadline: float | None = None) -> pa.Table:
        """Run guard-generated ``sql`` as a prepared statement of this thread's cursor, so
        a query asked again skips DuckDB's parsing, binding and planning (the plan cache
        one level down; the data is read every time). Only SQL the guard wrote itself,
        from a cached plan, comes here. Statements are ``user``'s own (keyed by user and
        SQL): another user's identical query prepares its own, so it is not faster for
        what someone else asked (a timing channel)."""
        local = self._local
        cur = getattr(local, "cursor", None)
        if cur is None:
            cur = local.cursor = self.con.cursor()
            local.prepared = SizedLRU(PREPARED_PER_THREAD, PREPARED_BYTES_PER_THREAD,
                                      lambda key, name: PREPARED_BYTES_PER_CHAR * len(key[1]))
        prepared: SizedLRU = local.prepared
        key = (user, sql)
        name = prepared.get(key)
        if name is None:
            name = f"__sekisho_p{next(self._names)}"
            cur.execute(f"PREPARE {name} AS {sql}")
            for _, old in prepared.put(key, name):
                if old != name:
                    cur.execute(f"DEALLOCATE {old}")
            if prepared.get(key) is None:   # larger than the whole budget: run once, not kept
                try:
                    with WATCHDOG.watch(cur, deadline):
                        return cur.execute(f"EXECUTE {name}").to_arrow_table(ARROW_BATCH_ROWS)
                finally:
                    cur.execute(f"DEALLOCATE {name}")
        with WATCHDOG.watch(cur, deadline):
            return cur.execute(f"EXECUTE {name}").to_arrow_table(ARROW_BATCH_ROWS)

    def is_person_unique(self, view: str, unit: str) -> bool:
        if view not in self.person_unique:
            n, d = self.cursor().execute(f'SELECT COUNT(*), COUNT(DISTINCT "{unit}") FROM "{view}"').fetchone()
            self.person_unique[view] = bool(n == d)
        return self.person_unique[view]

    def public_table(self, view: str, columns: list[str]) -> pa.Table:
        if view not in self.public:
            cols = ", ".join(f'"{c}"' for c in columns)
            self.public[view] = self.cursor().execute(f'SELECT {cols} FROM "{view}"').to_arrow_table()
        return self.public[view]


class Snapshots:
    """The snapshot queries run on: the store's current one, connected once."""

    def __init__(self, store: Store, policy: Policy, secret: bytes, limits: Limits, on_switch=None):
        self.store = store
        self.limits = limits
        self.policy = policy
        self.secret = secret
        self._on_switch = on_switch   # called (under the lock) when a new snapshot becomes current
        self._lock = threading.Lock()
        self.snapshot: Snapshot | None = None

    def current(self) -> Snapshot:
        try:
            sid = self.store.current_id()
        except StoreError:
            raise QueryRefused("no_data") from None
        if sid is None:
            raise QueryRefused("no_data")
        with self._lock:
            if self.snapshot is None or self.snapshot.id != sid:
                try:
                    backend = self.store.connect(sid)
                except StoreError:
                    raise QueryRefused("no_data") from None
                try:
                    recorded = self.store.info(sid).details.get("person_unique")
                except (StoreError, OSError, ValueError, TypeError):
                    recorded = None
                self.snapshot = Snapshot(sid, backend, self.perturbation_table(sid), self.limits,
                                         recorded if isinstance(recorded, dict) else None)
                if self._on_switch is not None:
                    self._on_switch()
                # the old connection stays open for queries already running on it
            return self.snapshot

    def perturbation_table(self, sid: str) -> PerturbationTable:
        """The cell-key table of snapshot ``sid``, seeded by the instance secret and the
        snapshot id: after an upload every cell's noise is a fresh draw, so the cells the
        upload left unchanged move as well and the newcomers' cells do not stand out."""
        p = self.policy.disclosure.perturbation
        return PerturbationTable(self.secret, max_noise=p.max_noise, variance=p.variance,
                                 label=p.seed, snapshot=sid)

    def reopen(self) -> None:
        """Open the current snapshot afresh at the next ``current`` (the policy changed:
        its perturbation table may have); queries running on the old one keep it."""
        with self._lock:
            self.snapshot = None

    def close(self) -> None:
        with self._lock:
            if self.snapshot is not None:
                try:
                    self.snapshot.con.close()
                except Exception:
                    pass
                self.snapshot = None


def fetch(snap: Snapshot, sql: str, *, prepared_for: str | None = None, deadline: float | None = None) -> Cells:
    """Run guard-written ``sql`` on ``snap``; with ``prepared_for`` (a user), as that
    user's prepared statement; interrupted at ``deadline`` (``time.monotonic``)."""
    try:
        if prepared_for is not None:
            table = snap.execute_prepared(sql, prepared_for, deadline)
        else:
            cur = snap.cursor()
            try:
                with WATCHDOG.watch(cur, deadline):
                    table = cur.execute(sql).to_arrow_table(ARROW_BATCH_ROWS)
            finally:
                cur.close()
        return cells_from_arrow(table)
    except duckdb.Error as exc:
        raise execution_refusal(exc) from None


def protected_schema(bp: BoundaryPlan, snap: Snapshot, *, probe: bool = False) -> pa.Schema:
    """The protected table's schema: ``__g<j>`` as the store types the group keys,
    ``__v<j>`` int64 for counts, float64 otherwise. Group keys that are bare view columns
    of a plain type take their type from the catalog; others (and ``probe``, for
    ``describe``, which reports row SQL that does not bind) ask the engine with a
    ``LIMIT 0`` query (about 0.6 ms on a new plan)."""
    cached = getattr(bp, "_schema", None)
    if cached is not None:
        return cached
    known = [arrow_type(k.column.sql_type) if k.column is not None else None for k in bp.group_keys]
    if probe or any(t is None for t in known):
        try:
            row_schema = snap.cursor().execute(f"SELECT * FROM ({bp.row_sql}) LIMIT 0").to_arrow_table().schema
        except duckdb.Error:
            raise QueryRefused("execution_failed") from None
        known = [row_schema.field(hidden.group_key(j)).type for j in range(len(bp.group_keys))]
    fields = [pa.field(hidden.group_key(j), t) for j, t in enumerate(known)]
    for j, agg in enumerate(bp.aggregates):
        fields.append(pa.field(hidden.protected_value(j), pa.int64() if agg.kind in COUNT_KINDS else pa.float64()))
    schema = pa.schema(fields)
    object.__setattr__(bp, "_schema", schema)
    return schema


def to_arrow(frame: Cells, bp: BoundaryPlan, snap: Snapshot) -> pa.Table:
    schema = protected_schema(bp, snap)
    rows = len(next(iter(frame.values()))) if frame else 0
    columns = []
    for f in schema:
        values = frame.get(f.name)
        if values is None:
            columns.append(pa.nulls(rows, type=f.type))
        elif isinstance(values, pa.Array):   # group keys, as the store returned them
            columns.append(values if values.type == f.type else values.cast(f.type))
        elif values.dtype.kind == "f" and pa.types.is_int64(f.type):
            # a count: whole numbers, NaN for NULL (suppressed or absent), built from an
            # int64 buffer and a null mask rather than by Arrow's float-to-int cast; with
            # cells_from_arrow reading single arrays, the answer path no longer runs
            # Arrow's pandas-style conversions at all (0.01-0.02 off the overhead ratio,
            # alternating both in one process; either change alone did not show)
            null = np.isnan(values)
            columns.append(pa.array(np.where(null, 0, values).astype(np.int64), type=f.type,
                                    mask=null if null.any() else None))
        elif values.dtype != object:
            # numeric, straight from numpy; NaN is NULL (a suppressed or absent value)
            columns.append(pa.array(values, type=f.type, from_pandas=True))
        else:
            try:
                columns.append(pa.array(values, type=f.type))   # object: None -> NULL
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                items = values.tolist()
                if pa.types.is_integer(f.type):
                    items = [None if v is None else int(v) for v in items]
                columns.append(pa.array(items, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)

class PostProcessor:
    """Post-processing in a sealed in-memory DuckDB per thread: no file or network access,
    configuration locked, no storage; it only ever holds the protected tables of the query
    being answered (registered, then unregistered), so its memory limit is the small
    ``post_memory_limit`` (with the data connection's limit per worker thread, the
    service's peak RSS grew by 2 GB of allowance per thread)."""

    def __init__(self, limits: Limits):
        self._local = threading.local()
        self.limits = limits

    def connection(self) -> duckdb.DuckDBPyConnection:
        con = getattr(self._local, "post", None)
        if con is None:
            con = duckdb.connect(":memory:", config={"enable_external_access": False, "lock_configuration": True,
                                                     "threads": 1, "memory_limit": self.limits.post_memory_limit,
                                                     "autoload_known_extensions": False,
                                                     "autoinstall_known_extensions": False})
            self._local.post = con
        return con

    def run(self, plan: Plan, protected: dict[str, pa.Table], snap: Snapshot, catalog: Catalog, *,
            limit_zero: bool = False, deadline: float | None = None) -> pa.Table:
        """Everything above the boundaries, on the protected tables (and public views)."""
        if plan.passthrough is not None and not plan.public_views:
            table = protected[plan.boundaries[0].name]
            sources = [src for src, _ in plan.passthrough]
            table = table.select(sources).rename_columns([out for _, out in plan.passthrough])
            return table.slice(0, 0) if limit_zero else table
        con = self.connection()
        registered: list[str] = []
        try:
            for name, table in protected.items():
                con.register(name, table)
                registered.append(name)
            for view in plan.public_views:
                columns = list(catalog.views[view].columns)
                con.register(view, snap.public_table(view, columns))
                registered.append(view)
            sql = plan.post_sql if not limit_zero else f"SELECT * FROM ({plan.post_sql}) AS __q LIMIT 0"
            try:
                with WATCHDOG.watch(con, deadline):
                    return con.execute(sql).to_arrow_table(ARROW_BATCH_ROWS)
            except duckdb.Error as exc:
                raise execution_refusal(exc) from None
        finally:
            for name in registered:
                try:
                    con.unregister(name)
                except duckdb.Error:
                    pass
