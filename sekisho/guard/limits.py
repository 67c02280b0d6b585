"""Resource governance per query: what one analyst's query may cost the guard.

From the instance's ``config.yaml`` (section ``guard``; every key optional)::

    guard:
      memory_limit: 2GB        # DuckDB memory_limit of each connection the guard opens to the data
      post_memory_limit: 256MB # ... of each post-processing connection (one per worker thread;
                               #     it holds only protected tables, at most max_cells rows)
      threads: 2               # DuckDB threads of each connection
      query_seconds: 60        # wall-clock limit of one query's statements (then interrupted)
      max_cells: 250000        # estimated cells of one query, checked before anything runs
      undensified_cells: 100000  # cells assumed for the group keys without a public domain, jointly
      max_running: 4           # queries executing at once, all users
      max_running_per_user: 2  # ... of one user (fair share)

Three mechanisms, in the order a query meets them:

* ``estimate_cells``: the cells a query can produce, from the policy and public domains
  only, never from the data or engine statistics: when every key has a public domain
  the cells are densified onto their grid, whose size counts in full; otherwise groups
  exist only where rows do, so the product of the keys' values (integer bounds, CASE
  branches, domains, or unknown) counts as at most ``undensified_cells``. Over ``max_cells`` the
  query is refused (``result_too_large``, naming the estimate and the cap) before it
  is executed.
* ``Admission``: at most ``max_running`` queries execute at once and at most
  ``max_running_per_user`` of one user; a waiting query is admitted in fair order (the
  user with fewest running queries, then the one admitted least recently, then arrival),
  so one analyst's burst cannot starve the others. A query that waits past its deadline
  is refused as ``guard_busy`` (a matter of load, not of the data).
* ``Watchdog``: a statement still running at the query's deadline is interrupted
  (DuckDB ``interrupt``); it and DuckDB's out-of-memory error become one refusal,
  ``resource_limit``, whatever caused it. Whether a query hits a limit can depend on the
  data, so the refusal is one code for both, the DP budget has been debited before
  execution, and the refusal raises an alert (see the threat model in ``sekisho.guard``).
* ``Cancel``: the caller's handle to stop a query whose answer nobody waits for any more
  (the service, when its client has gone): the statement running is interrupted and the
  query ends as ``cancelled``.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import re
import threading
import time
from dataclasses import dataclass, fields

import duckdb
from sqlglot import exp

from sekisho.errors import SekishoError
from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused
from sekisho.guard.protect.threshold import MAX_DENSE_CELLS
from sekisho.guard.rewrite import Plan

BOOLEAN_VALUES = 3   # TRUE, FALSE, NULL
CANCEL_POLL = 0.25   # seconds: how soon a cancelled query waiting for admission leaves the queue
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


class LimitsError(SekishoError):
    """The ``guard`` section of config.yaml is not valid."""


@dataclass(frozen=True)
class Limits:
    memory_limit: str = "2GB"
    post_memory_limit: str = "256MB"
    threads: int = 2
    query_seconds: float = 60.0
    max_cells: int = 250_000
    undensified_cells: int = 100_000
    max_running: int = 4
    max_running_per_user: int = 2

    @classmethod
    def from_config(cls, config: dict | None) -> "Limits":
        """The limits in ``config["guard"]``; a wrong key or value is an error naming its path."""
        section = (config or {}).get("guard") or {}
        if not isinstance(section, dict):
            raise LimitsError("guard: must be a mapping")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in section.items():
            if key not in known:
                raise LimitsError(f"guard.{key}: unknown key (allowed: {', '.join(sorted(known))})")
            if key in ("memory_limit", "post_memory_limit"):
                if not isinstance(value, str) or not _MEMORY.match(value.strip()):
                    raise LimitsError(f"guard.{key}: {value!r} is not a size such as '2GB'")
                values[key] = value.strip()
                continue
            kind = float if known[key].type == "float" else int
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                    (kind is int and int(value) != value):
                raise LimitsError(f"guard.{key}: {value!r} must be a positive {'number' if kind is float else 'integer'}")
            values[key] = kind(value)
        return cls(**values)

    def connection_settings(self) -> dict[str, object]:
        """DuckDB settings for every connection the guard opens."""
        return {"memory_limit": self.memory_limit, "threads": self.threads}


def configure(con, limits: Limits) -> None:
    """Apply ``limits`` to an open DuckDB connection (DuckDB's default memory limit is 80%
    of RAM per database: a few connections could exhaust the machine)."""
    for name, value in limits.connection_settings().items():
        con.execute(f"SET {name} = '{value}'" if isinstance(value, str) else f"SET {name} = {int(value)}")


# ---- cells a query can produce -------------------------------------------------------------
def _column_values(name: str, catalog: Catalog, views: tuple[str, ...], unknown: int) -> int:
    """Distinct values (with NULL) a column can take, from the policy: its public domain,
    its integer bounds, BOOLEAN; the largest over the plan's views that have it."""
    best = 0
    for view in views:
        info = catalog.views.get(view)
        column = info.columns.get(name) if info is not None else None
        if column is None:
            continue
        if column.domain:
            n = len(column.domain) + 1
        elif column.bounds and float(column.bounds[0]).is_integer() and float(column.bounds[1]).is_integer() \
                and "INT" in (column.sql_type or "").upper():
            n = int(column.bounds[1] - column.bounds[0]) + 2
        elif (column.sql_type or "").upper() == "BOOLEAN":
            n = BOOLEAN_VALUES
        else:
            n = unknown
        best = max(best, n)
    return best or unknown


def key_values(node: exp.Expression, catalog: Catalog, views: tuple[str, ...], unknown: int) -> int:
    """An upper bound on the distinct values of one group key expression."""
    if isinstance(node, (exp.Paren, exp.Alias)):
        return key_values(node.this, catalog, views, unknown)
    if isinstance(node, (exp.Literal, exp.Null)):
        return 1
    if isinstance(node, exp.Boolean) or isinstance(node, (exp.Predicate, exp.Connector, exp.Not)):
        return BOOLEAN_VALUES
    if isinstance(node, exp.Column):
        return _column_values(node.name, catalog, views, unknown)
    if isinstance(node, exp.Case):
        branches = [b.args.get("true") for b in node.args.get("ifs") or []]
        default = node.args.get("default")
        total = sum(key_values(b, catalog, views, unknown) for b in branches if b is not None)
        return total + (key_values(default, catalog, views, unknown) if default is not None else 1)
    if isinstance(node, exp.If):
        false = node.args.get("false")
        return key_values(node.args["true"], catalog, views, unknown) + \
            (key_values(false, catalog, views, unknown) if false is not None else 1)
    # any other function of columns takes at most as many values as its columns jointly do
    product = 1
    for column in {c.name: c for c in node.find_all(exp.Column)}.values():
        product *= _column_values(column.name, catalog, views, unknown)
    return product


def estimate_cells(plan: Plan, catalog: Catalog, limits: Limits) -> int:
    """Cells the plan's boundaries can produce, summed. A boundary whose keys all have a
    public domain is densified onto their grid (``protect.threshold.densify``, up to
    ``MAX_DENSE_CELLS``): the grid's size. Otherwise its groups exist only where rows do:
    the product of its keys' values, at most ``undensified_cells``."""
    total = 0
    for bp in plan.boundaries:
        product = 1
        for key in bp.group_keys:
            product *= len(key.domain) + 1 if key.domain else \
                max(key_values(key.expr, catalog, plan.views, limits.undensified_cells), 1)
        densified = bp.group_keys and all(k.domain for k in bp.group_keys) and product <= MAX_DENSE_CELLS
        total += product if densified else min(product, limits.undensified_cells)
    return total


def check_cells(plan: Plan, catalog: Catalog, limits: Limits) -> int:
    estimate = estimate_cells(plan, catalog, limits)
    if estimate > limits.max_cells:
        raise QueryRefused("result_too_large", part=f"estimate {estimate:,} cells > limit {limits.max_cells:,}")
    return estimate


# ---- fair share ----------------------------------------------------------------------------
class Admission:
    """Admission of queries to execution (see the module docstring)."""

    def __init__(self, max_running: int, per_user: int):
        self.max_running, self.per_user = max_running, per_user
        self._cv = threading.Condition()
        self._running: dict[str, int] = {}
        self._last: dict[str, int] = {}          # user -> tick of their last admission
        self._ticks = itertools.count(1)
        self._arrivals = itertools.count()
        self._waiting: list[tuple[int, str]] = []   # (arrival, user)
        self.admitted: list[str] = []             # admission order (last 1,000), for tests and tools

    def _next(self) -> tuple[int, str] | None:
        if sum(self._running.values()) >= self.max_running:
            return None
        eligible = [w for w in self._waiting if self._running.get(w[1], 0) < self.per_user]
        if not eligible:
            return None
        return min(eligible, key=lambda w: (self._running.get(w[1], 0), self._last.get(w[1], 0), w[0]))

    @contextlib.contextmanager
    def slot(self, user: str, deadline: float):
        cancel = _CANCEL.get()
        if cancel is not None:
            cancel.check()   # cancelled before it was admitted: nothing is executed
        with self._cv:
            me = (next(self._arrivals), user)
            self._waiting.append(me)
            try:
                while self._next() != me:
                    if cancel is not None:
                        cancel.check()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueryRefused("guard_busy")
                    # a cancelled query leaves the queue within CANCEL_POLL seconds
                    self._cv.wait(remaining if cancel is None else min(remaining, CANCEL_POLL))
            finally:
                self._waiting.remove(me)
            self._running[user] = self._running.get(user, 0) + 1
            self._last[user] = next(self._ticks)
            self.admitted.append(user)
            del self.admitted[:-1000]
            self._cv.notify_all()   # another waiting query may be admissible too
        try:
            yield
        finally:
            with self._cv:
                self._running[user] -= 1
                if not self._running[user]:
                    del self._running[user]
                self._cv.notify_all()


# ---- cancellation --------------------------------------------------------------------------
class Cancel:
    """The caller's handle on one query, to stop it when its answer is no longer wanted
    (the guard service: the client went away). ``cancel()`` may be called from any
    thread: the DuckDB statement running is interrupted, none is started after it, a
    query still waiting for admission leaves the queue, and the query ends as the
    refusal ``cancelled`` (audited as such; the DP budget, debited before execution,
    stays spent). Whether and when a query is cancelled is the client's choice, not the
    data's, so it raises no alert."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: list = []
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        for con in running:
            try:
                con.interrupt()
            except Exception:
                pass

    def check(self) -> None:
        if self._cancelled:
            raise QueryRefused("cancelled")

    @contextlib.contextmanager
    def running(self, con):
        with self._lock:
            self.check()
            self._running.append(con)
        try:
            yield
        except duckdb.Error:
            self.check()    # interrupted because cancelled: say so, not "resource_limit"
            raise
        finally:
            with self._lock:
                self._running.remove(con)


_CANCEL: contextvars.ContextVar[Cancel | None] = contextvars.ContextVar("sekisho_cancel", default=None)


@contextlib.contextmanager
def cancellable(cancel: Cancel | None):
    """Statements run in this block (this thread) stop when ``cancel`` is cancelled."""
    token = _CANCEL.set(cancel)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def current_cancel() -> Cancel | None:
    return _CANCEL.get()


# ---- time limit ------------------------------------------------------------------------------
class Watchdog:
    """One thread that interrupts DuckDB statements still running at their deadline."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._watched: dict[int, object] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, con, deadline: float | None):
        """Interrupt ``con`` if the block is still running at ``deadline`` (monotonic);
        a deadline already past interrupts at once. The query's ``Cancel`` (if any)
        interrupts it as well."""
        cancel = _CANCEL.get()
        if cancel is not None:
            with cancel.running(con), self._deadline(con, deadline):
                yield
            return
        with self._deadline(con, deadline):
            yield

    @contextlib.contextmanager
    def _deadline(self, con, deadline: float | None):
        if deadline is None:
            yield
            return
        with self._cv:
            token = next(self._ids)
            self._watched[token] = con
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sekisho-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._watched.pop(token, None)

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._watched:
                    heapq.heappop(self._heap)    # finished in time
                if not self._heap:
                    self._cv.wait(60)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                con = self._watched.pop(token, None)
                if con is not None:
                    try:
                        con.interrupt()
                    except Exception:
                        pass


WATCHDOG = Watchdog()
