"""The guard: the only way to compute on person-level data.

``Guard.query`` = who is asking (role) -> analysis passes (``analyze``) -> rewrite into
boundary row SELECTs and post-processing (``rewrite``) -> [DP: debit budget] -> cells on
the store (``cells``) -> protection (``protect``) -> post-processing in a separate,
sealed in-memory DuckDB holding only protected tables and public views -> audit ->
answer. Audit: once the query is planned, its request entry (``query.request``: user,
SQL, fingerprint, views, mode, snapshot) is made durable on a helper thread while the
store executes it; the answer waits for it, then the outcome entry (``query``, linked by
``request``) is written and the answer leaves, the outcome's fsync and the alert
bookkeeping following on a second helper thread. Any failure before the request entry is
durable and the outcome entry written releases nothing; a power cut can lose the outcome
of the last answers, never their request.

Side channels: refusal texts are fixed per code; execution errors of the store are
reported as one generic refusal without the engine's message (which could quote a data
value); the only data-dependent refusals are ``filter_population_below_k``, decided on a
perturbed count, ``unit_view_not_person_unique``, a property of a whole view (one
row per person or not) that the policy's description of the view already states, and
``paused_for_review`` (a hold raised by a differencing/decomposition alert: one bit per
admin review, see ``sekisho.guard.alerts``). Timing is not equalised (residual risk, see the README of the guard);
the caches that make a repeated query faster (plans, condition-influence verdicts, DuckDB
prepared statements) are per user, so nothing one analyst asks makes another's faster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import numbers
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from sekisho.audit import AuditError
from sekisho.guard import alerts as alert_rules
from sekisho.guard import budget as ledger
from sekisho.guard.analyze import analyze
from sekisho.guard.catalog import IDENTIFIER_CLASSES, Catalog, catalog_for_role
from sekisho.guard.cells import Bounding, cells_sql, population_sql
from sekisho.guard.errors import QueryRefused
from sekisho.guard.influence import Variant, apply, batch, closest, influence_sql, is_flat, neighbourhood
from sekisho.guard.protect.cellkey import KEY_RANGE, PerturbationTable
from sekisho.guard.protect.dp import DPParams, protect_dp
from sekisho.guard.protect.threshold import (COUNT_KINDS, Cells, ProtectionStats, cells_from_arrow, number,
                                             protect_threshold)
from sekisho.guard.rewrite import BoundaryPlan, Plan, plan as make_plan
from sekisho.instance import Instance
from sekisho.policy import load_instance_policy
from sekisho.state import role_of
from sekisho.store import Store, StoreError

log = logging.getLogger(__name__)

PLAN_CACHE_SIZE = 512
PREPARED_PER_THREAD = 256   # DuckDB prepared statements kept per thread and snapshot (all users)
# Rows per Arrow batch when the guard fetches from DuckDB. With DuckDB's default batch of
# 1,000,000 rows a small grouped result took 0.1-0.3 ms longer to fetch than with one
# DuckDB vector (2,048 rows) per batch, and a 150,000-cell result was no faster (measured
# alternating both on the 530k city; benchmarks/guard_overhead.py compares the guard with
# the raw SQL fetched DuckDB's default way and, prepared, the guard's way).
ARROW_BATCH_ROWS = 2048
INFLUENCE_CACHE_SIZE = 2048
# DP on unit rows, privacy unit still the person: a person is in exactly one unit row
# (person-unique view; each unit bounded to one row and one cell), so adding or removing
# them changes one unit's features — it leaves one cell and enters another: at most 2
# cells change, each by 1 (L1 sensitivity 2), which calibrates both noise and selection.
UNIT_DP_SENSITIVITY = 2
MODES = ("threshold", "dp")
MAX_NEIGHBOURS = 96        # neighbouring queries checked for condition influence (one scan each)
MAX_NEIGHBOURS_FLAT = 1024  # ... when all are evaluated in one scan of a single view
INFLUENCE_ROUNDS = 8   # leaving conditions out can make others small: re-checked up to this often
# a snapshot the bookkeeping opens to verify a differencing pair (not the guard's current one)
VERIFY_MEMORY_LIMIT = "512MB"
VERIFY_THREADS = 1


@dataclass
class GuardResult:
    table: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)


def _best_effort_fingerprint(sql) -> str:
    """Fingerprint of a refused query (literals masked when it parses, else its text)."""
    import hashlib

    from sekisho.guard.analyze import fingerprint, parse_single_select
    try:
        return fingerprint(parse_single_select(sql))[1]
    except Exception:
        return "raw:" + hashlib.sha256(repr(sql).encode()).hexdigest()[:16]


def _settle(request: Future | None, *, quiet: bool = False) -> None:
    """Wait for the request entry before recording how the request ended, so the two
    stay in order; a request entry that could not be written is an AuditError (nothing
    is answered), unless one is already being raised (``quiet``)."""
    if request is None:
        return
    try:
        request.result()
    except AuditError:
        if not quiet:
            raise


def _shape(fingerprint: str, bp: BoundaryPlan) -> str:
    """The shape a boundary releases its population under (``decomposition`` alert): the
    query's fingerprint plus the boundary's group keys and aggregates *with* their
    literals, so moving a cut point (``GROUP BY age < 40`` / ``< 41``) or putting several
    decompositions in one query makes new shapes. Memoised on the cached plan."""
    memo = getattr(bp, "_shape_sql", None)
    if memo is None:
        memo = "|".join([k.expr.sql(dialect="duckdb") for k in bp.group_keys] +
                        [a.node.sql(dialect="duckdb") if a.node is not None else a.kind for a in bp.aggregates])
        object.__setattr__(bp, "_shape_sql", memo)
    return hashlib.sha256(f"{fingerprint}\x00{memo}".encode()).hexdigest()[:16]


def _execution_refusal(exc: Exception) -> QueryRefused:
    """Binder errors are decided from the SQL and the schema before any row is read, so
    their message may be shown; anything raised while executing (conversion, overflow,
    ...) may quote a data value and is withheld."""
    if isinstance(exc, (duckdb.BinderException, duckdb.ParserException, duckdb.CatalogException)):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return QueryRefused("execution_failed", part=first[:200])
    return QueryRefused("execution_failed")


class _Snapshot:
    """The read-only connection to one snapshot plus what the guard caches about it."""

    def __init__(self, sid: str, backend, ptable: PerturbationTable):
        self.id = sid
        self.backend = backend
        # this snapshot's own cell-key table: every threshold answer, population check and
        # condition-influence verdict on this snapshot uses it (consistent within the
        # snapshot, a fresh draw after an upload; see sekisho.guard.protect.cellkey)
        self.ptable = ptable
        self.con: duckdb.DuckDBPyConnection = backend.con
        self.lock = threading.Lock()
        self._local = threading.local()   # this thread's cursor and its prepared statements
        self._names = itertools.count()
        self.types: dict[str, dict[str, str]] = {}
        self.person_unique: dict[str, bool] = {}
        self.public: dict[str, pa.Table] = {}
        for (name,) in self.con.execute("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main'").fetchall():
            self.types[name] = {c: t for c, t, *_ in self.con.execute(f'DESCRIBE "{name}"').fetchall()}

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self.con.cursor()

    def execute_prepared(self, sql: str, user: str) -> pa.Table:
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
            local.prepared = OrderedDict()
        prepared: OrderedDict[tuple[str, str], str] = local.prepared
        key = (user, sql)
        name = prepared.get(key)
        if name is None:
            name = f"__sekisho_p{next(self._names)}"
            cur.execute(f"PREPARE {name} AS {sql}")
            prepared[key] = name
            while len(prepared) > PREPARED_PER_THREAD:
                _, old = prepared.popitem(last=False)
                cur.execute(f"DEALLOCATE {old}")
        else:
            prepared.move_to_end(key)
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


class Guard:
    def __init__(self, instance: Instance, *, policy=None):
        self.instance = instance
        self.policy = policy or load_instance_policy(instance)
        self.store = Store(instance)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._snapshot: _Snapshot | None = None
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        # Caches that make a repeated query faster are per user (a shared one is a timing
        # channel: a query another analyst asked before would answer faster), bounded LRU.
        # (user, role, snapshot, SQL) -> plan
        self._plans: OrderedDict[tuple[str, str, str, str], Plan] = OrderedDict()
        # (user, snapshot, row SQL) -> (row SQL to execute, conditions left out): a
        # deterministic function of the snapshot (perturbed counts), computed once per user
        self._influence: OrderedDict[tuple[str, str, str], tuple[str, tuple[str, ...]] | QueryRefused] = \
            OrderedDict()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_pid = os.getpid()

    # ---- public API ------------------------------------------------------------
    def views(self, user: str) -> dict[str, Any]:
        role = self._role(user)
        out = {}
        for vname in self.policy.roles[role].views:
            view = self.policy.views[vname]
            out[vname] = {"title": view.title_ja, "purpose": view.purpose, "public": view.public,
                          "columns": {c.name: {"type": c.type, "class": c.cls, "description": c.description_ja,
                                               **({"domain": list(c.domain)} if c.domain else {}),
                                               **({"bounds": list(c.bounds)} if c.bounds else {})}
                                      for c in view.columns.values()}}
        return out

    def budget(self, user: str) -> dict[str, Any]:
        self._role(user)
        dp = self.policy.disclosure.dp
        period = ledger.current_period(dp.period)
        spent = ledger.spent(self.instance, user, period)
        return {"period": period, "total": dp.budget_per_period, "spent": spent,
                "remaining": max(dp.budget_per_period - spent, 0.0),
                "epsilon_per_query_min": dp.epsilon_per_query_min,
                "epsilon_per_query_max": dp.epsilon_per_query_max}

    def describe(self, sql: str, *, user: str) -> pa.Schema:
        """Result schema of ``sql`` without reading data or spending budget. Not audited:
        it reveals only what ``views`` already shows (names and types), and refusals
        here are the same static decisions ``query`` would audit."""
        role = self._role(user)
        snap = self._current()
        catalog = self._catalog(role, snap)
        plan = self._plan(sql, user, role, snap, catalog)
        protected = {bp.name: self._empty_protected(bp, snap) for bp in plan.boundaries}
        table = self._post_process(plan, protected, snap, catalog, limit_zero=True)
        return table.schema

    def query(self, sql: str, *, user: str, mode: str | None = None, epsilon: float | None = None,
              operator: str | None = None) -> GuardResult:
        """Answer ``sql`` for ``user`` (``operator``: who acts for them, e.g. root with --as)."""
        started = time.perf_counter()
        role = None
        fingerprint = "unparsed"
        views: list[str] = []
        request: Future | None = None   # the request's audit entry, made durable while the query runs
        try:
            role = self._role(user)
            if alert_rules.hold_of(self.instance, user) is not None:   # one primary-key read, no data
                raise QueryRefused("paused_for_review")
            role_def = self.policy.roles[role]
            mode = mode or role_def.default_mode
            if mode not in MODES or mode not in role_def.modes:
                raise QueryRefused("mode_not_allowed", part=str(mode))
            eps = self._check_epsilon(epsilon) if mode == "dp" else None
            snap = self._current()
            catalog = self._catalog(role, snap)
            plan = self._plan(sql, user, role, snap, catalog)
            fingerprint, views = plan.fingerprint, list(plan.views)
            request = self._announce(user, role, sql, plan, mode, eps, snap, operator)
            if mode == "dp":
                table, stats, eps_info = self._run_dp(plan, snap, catalog, user, eps)
                left_out, defined = [], [None] * len(stats)
            else:
                table, stats, left_out, defined = self._run_threshold(
                    plan, snap, catalog, user, influence=self.policy.disclosure.condition_influence and
                    role_def.condition_influence)
                eps_info = {"epsilon_spent": 0.0, "epsilon_remaining": None}
            request_seq = request.result()["seq"]   # durable before anything leaves (AuditError: nothing)
        except QueryRefused as refusal:
            _settle(request)
            if fingerprint == "unparsed":
                fingerprint = _best_effort_fingerprint(sql)
            self._audit_refusal(user, role, sql, fingerprint, views, mode, refusal, started, operator)
            raise
        except AuditError:
            _settle(request, quiet=True)
            raise
        except Exception:
            _settle(request)
            # fail closed and audited: an unexpected error releases nothing and is recorded
            # as a refusal without its message (which could quote a data value)
            refusal = QueryRefused("execution_failed")
            if fingerprint == "unparsed":
                fingerprint = _best_effort_fingerprint(sql)
            self._audit_refusal(user, role, sql, fingerprint, views, mode, refusal, started, operator)
            raise refusal from None
        summary = self._summary(mode, table, stats, eps_info, plan, left_out)
        details = {"sql": sql, "fingerprint": fingerprint, "normalized": plan.normalized_sql, "views": views,
                   "mode": mode, "decision": "allowed", "rows": table.num_rows,
                   "cells": summary["cells"], "cells_suppressed": summary["cells_suppressed"],
                   "values_suppressed_dominance": summary["values_suppressed_dominance"],
                   "rows_dropped_below_k": sum(s.rows_dropped for s in stats),
                   "conditions_left_out": left_out,
                   "epsilon_spent": eps_info["epsilon_spent"],
                   "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                   "request": request_seq}
        if operator:
            details["operator"] = operator
        # the outcome is written (chained, sealed, readable) before the answer leaves; its
        # fsync runs on the bookkeeping thread, as the request entry is already durable
        entry = self._audit_and_alert(
            dict(type="query", user=user, role=role, outcome="ok",
                 summary=f"{mode} query on {', '.join(views) or '-'}: {table.num_rows} rows", details=details,
                 durable=False),
            dict(user=user, role=role, fingerprint=fingerprint, refused=False, cells=summary["cells"],
                 populations=[(*s.population, _shape(fingerprint, bp), *(d or ()))
                              for s, bp, d in zip(stats, plan.boundaries, defined) if s.population is not None]))
        summary["query_id"] = entry["seq"]
        return GuardResult(table=table, summary=summary)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        if self._pools_pid == os.getpid():
            for pool in pools.values():
                pool.shutdown(wait=True)   # pending audit and alert bookkeeping finish first
        with self._lock:
            if self._snapshot is not None:
                try:
                    self._snapshot.con.close()
                except Exception:
                    pass
                self._snapshot = None

    # ---- who, what, where --------------------------------------------------------
    def _role(self, user: str) -> str:
        role = role_of(self.instance, user) if isinstance(user, str) and user else None
        if role is None or role not in self.policy.roles:
            raise QueryRefused("unknown_user", part=str(user)[:64])
        if not self.policy.roles[role].views:
            raise QueryRefused("role_has_no_views", part=role)
        return role

    def _check_epsilon(self, epsilon) -> float:
        """ε as a float in the policy's [epsilon_per_query_min, epsilon_per_query_max],
        else ``epsilon_invalid`` — decided here, before the ledger is touched, so that no
        ε that passes fails later in the DP mechanisms (tiny or subnormal values do)."""
        dp = self.policy.disclosure.dp
        refused = QueryRefused("epsilon_invalid", part=repr(epsilon)[:40])
        if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, numbers.Real):
            raise refused   # bools, strings, None, complex, Decimal: not a number of ours
        try:
            value = float(epsilon)
        except (TypeError, ValueError, OverflowError):
            raise refused from None
        if not (math.isfinite(value) and dp.epsilon_per_query_min <= value <= dp.epsilon_per_query_max):
            raise refused   # NaN, ±inf, 0, -0.0, subnormal, below the minimum, above the cap
        return value

    def _current(self) -> _Snapshot:
        try:
            sid = self.store.current_id()
        except StoreError:
            raise QueryRefused("no_data") from None
        if sid is None:
            raise QueryRefused("no_data")
        with self._lock:
            if self._snapshot is None or self._snapshot.id != sid:
                try:
                    backend = self.store.connect(sid)
                except StoreError:
                    raise QueryRefused("no_data") from None
                self._snapshot = _Snapshot(sid, backend, self._perturbation_table(sid))
                self._catalogs.clear()
                self._plans.clear()
                self._influence.clear()
                # the old connection stays open for queries already running on it
            return self._snapshot

    def _perturbation_table(self, sid: str) -> PerturbationTable:
        """The cell-key table of snapshot ``sid``, seeded by the instance secret and the
        snapshot id: after an upload every cell's noise is a fresh draw, so the cells the
        upload left unchanged move as well and the newcomers' cells do not stand out."""
        p = self.policy.disclosure.perturbation
        return PerturbationTable(self.instance.secret, max_noise=p.max_noise, variance=p.variance,
                                 label=p.seed, snapshot=sid)

    @property
    def ptable(self) -> PerturbationTable:
        """The perturbation table of the current snapshot (for tests and tools; a query
        uses the table of the snapshot it runs on)."""
        return self._current().ptable

    def _catalog(self, role: str, snap: _Snapshot) -> Catalog:
        key = (role, snap.id)
        cat = self._catalogs.get(key)
        if cat is None:
            cat = catalog_for_role(self.policy, role, snap.types)
            self._catalogs[key] = cat
        return cat

    def _plan(self, sql: str, user: str, role: str, snap: _Snapshot, catalog: Catalog) -> Plan:
        """``sql``'s plan against ``catalog`` (the catalog of ``snap``, the snapshot the
        query runs on — not whichever is current by now), cached per user."""
        key = (user, role, snap.id, sql)
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                return cached
        try:
            result = make_plan(analyze(sql, catalog), catalog)
        except QueryRefused:
            raise
        except RecursionError:
            raise QueryRefused("too_complex") from None
        except Exception:  # fail closed: an input the analysis does not handle is refused
            raise QueryRefused("unsupported_query") from None
        with self._lock:
            self._plans[key] = result
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return result

    # ---- execution ----------------------------------------------------------------
    def _fast_path(self, bp: BoundaryPlan, snap: _Snapshot, catalog: Catalog) -> bool:
        unit = catalog.views[bp.personal_view].privacy_unit
        person_unique = snap.is_person_unique(bp.personal_view, unit)
        if bp.unit:
            # k units imply k persons only when each person is in exactly one unit row
            if not person_unique:
                raise QueryRefused("unit_view_not_person_unique", part=bp.personal_view)
            return not bp.has_join      # unit rows are one per linkage key by construction
        return not bp.has_join and person_unique

    @staticmethod
    def _cells_sql(bp: BoundaryPlan, person_unique: bool) -> str:
        """The threshold cells SQL of a cached plan's boundary, written once per plan."""
        memo = getattr(bp, "_cells_sql", None)
        if memo is None:
            memo = {}
            object.__setattr__(bp, "_cells_sql", memo)
        sql = memo.get(person_unique)
        if sql is None:
            sql = memo[person_unique] = cells_sql(bp, person_unique=person_unique)
        return sql

    def _fetch(self, snap: _Snapshot, sql: str, *, prepared_for: str | None = None) -> Cells:
        """Run ``sql`` on ``snap``; with ``prepared_for`` (a user), as that user's
        prepared statement."""
        try:
            if prepared_for is not None:
                table = snap.execute_prepared(sql, prepared_for)
            else:
                table = snap.cursor().execute(sql).to_arrow_table(ARROW_BATCH_ROWS)
            return cells_from_arrow(table)
        except duckdb.Error as exc:
            raise _execution_refusal(exc) from None

    def _domains(self, bp: BoundaryPlan) -> list:
        return [k.domain for k in bp.group_keys]

    def _run_threshold(self, plan: Plan, snap: _Snapshot, catalog: Catalog, user: str, *,
                       influence: bool = True):
        """Answer ``plan`` in threshold mode: (table, stats, conditions left out, and per
        boundary what defines its population: (snapshot id, row SQL as executed))."""
        d = self.policy.disclosure
        protected, stats, conditions_left_out, defined = {}, [], [], []
        for bp in plan.boundaries:
            fast = self._fast_path(bp, snap, catalog)
            run, left_out = self._neutralise_conditions(bp, snap, catalog, fast, user) if influence else (bp, ())
            cells = self._fetch(snap, self._cells_sql(run, fast), prepared_for=user)
            population = self._check_population(run, snap, cells, fast, user) if bp.filtered else None
            frame, st = protect_threshold(cells, bp.aggregates, self._domains(bp), k=d.k, table=snap.ptable,
                                          min_count=d.perturbation.min_count, nk_n=d.dominance.nk_n,
                                          nk_k=d.dominance.nk_k, p_percent=d.dominance.p_percent,
                                          perturb=d.perturbation.enabled)
            st.population = population
            conditions_left_out += [c for c in left_out if c not in conditions_left_out]
            protected[bp.name] = self._to_arrow(frame, bp, snap)
            stats.append(st)
            defined.append((snap.id, run.row_sql))
        return self._post_process(plan, protected, snap, catalog), stats, conditions_left_out, defined

    def _check_population(self, bp: BoundaryPlan, snap: _Snapshot, cells: Cells, fast: bool,
                          user: str) -> tuple[int, int]:
        """Refuse when the filtered population is below k — on a perturbed count, so the
        decision itself carries the same noise as any released count. Returns the
        population's true size and cell key (for the differencing/decomposition alerts)."""
        if fast:   # the cells partition the filtered persons: their counts and keys add up
            n = int(cells["__n"].sum())
            # perturb_count takes it mod KEY_RANGE; an empty population's key is NULL (NaN)
            ck = int(np.nansum(cells["__ck"]))
        else:
            pop = self._fetch(snap, population_sql(bp), prepared_for=user)
            n, ck = int(number(pop, "__n", np.int64)[0]), int(number(pop, "__ck", np.int64)[0])
        if snap.ptable.perturb_count(ck, n) < self.policy.disclosure.k:
            raise QueryRefused("filter_population_below_k")
        return n, ck % KEY_RANGE   # the population's identity: same contributors, same (n, key)

    def _neutralise_conditions(self, bp: BoundaryPlan, snap: _Snapshot, catalog: Catalog,
                               fast: bool, user: str) -> tuple[BoundaryPlan, tuple[str, ...]]:
        """Apply the condition-influence rule (``sekisho.guard.influence``): a condition
        that changes who is counted by fewer than k contributors (perturbed count) is not
        applied — the query is answered as its neighbour without it, whether the condition
        changes nobody or one person, so the answer cannot tell the two apart. Returns the
        boundary to execute and the conditions left out (for the summary and the audit).
        The verdict is cached per user (``user``'s own queries only)."""
        key = (user, snap.id, bp.row_sql)
        with self._lock:
            verdict = self._influence.get(key)
        if verdict is None:
            try:
                verdict = self._influence_verdict(bp, snap, catalog, fast)
            except QueryRefused as refusal:
                verdict = refusal
            with self._lock:
                self._influence[key] = verdict
                while len(self._influence) > INFLUENCE_CACHE_SIZE:
                    self._influence.popitem(last=False)
        if isinstance(verdict, QueryRefused):
            raise QueryRefused(verdict.code, part=verdict.part)
        row_sql, left_out = verdict
        if not left_out:
            return bp, ()
        return dataclasses.replace(bp, row_sql=row_sql), left_out

    def _influence_verdict(self, bp: BoundaryPlan, snap: _Snapshot, catalog: Catalog,
                           fast: bool) -> tuple[str, tuple[str, ...]]:
        identifiers = frozenset(c.name for v in catalog.views.values() for c in v.columns.values()
                                if c.cls in IDENTIFIER_CLASSES)
        columns = [f"__g{j}" for j in range(len(bp.group_keys))] + \
            [f"__a{j}" for j, agg in enumerate(bp.aggregates) if agg.arg is not None]
        k = self.policy.disclosure.k
        row_sql, left_out = bp.row_sql, []
        pending = None   # (query before the last batch, its closest single choice, left_out before)
        for round_ in range(INFLUENCE_ROUNDS + 1):
            base, neighbours = neighbourhood(row_sql, identifiers)
            compared = list(neighbours)
            if pending is not None:
                # how far the last batch moved the query: it must stay below k as well
                compared.append(Variant(atom="", index=-1, action="drift", sql=pending[0]))
            if not compared:
                break
            limit = MAX_NEIGHBOURS_FLAT if is_flat(base) else MAX_NEIGHBOURS
            if len(compared) > limit:
                raise QueryRefused("too_complex", part=f"{len(neighbours) // 2}+ conditions")
            sql = influence_sql(base, compared, columns, person_unique=fast and not bp.unit)
            row = self._fetch(snap, sql)
            n = [int(number(row, f"__n{i}", np.int64)[0]) for i in range(len(compared))]
            ck = [int(number(row, f"__ck{i}", np.int64)[0]) for i in range(len(compared))]
            noisy = [int(v) for v in snap.ptable.perturb_counts(ck, n)]
            if round_ == 0 and bp.filtered and any(v < k for v in noisy):
                # a query that selects fewer than k is refused as such, before any condition
                # is left out (which would otherwise widen it into an answer)
                population = snap.ptable.perturb_counts([int(number(row, "__ck", np.int64)[0])],
                                                        [int(number(row, "__n", np.int64)[0])])[0]
                if population < k:
                    raise QueryRefused("filter_population_below_k")
            if pending is not None:
                before, single, left_before = pending
                pending = None
                if noisy.pop() >= k:
                    # the batch changed too much together: leave out only the closest one
                    row_sql, left_out = apply(before, single), left_before + [v.atom for v in single]
                    continue
            small = [(neighbours[i], value) for i, value in enumerate(noisy) if value < k]
            if not small:
                break
            if round_ == INFLUENCE_ROUNDS:
                # still not stable after the rounds allowed: refuse rather than guess
                raise QueryRefused("condition_influence_below_k", part=min(small, key=lambda o: o[1])[0].atom)
            chosen = batch(small)
            if len(chosen) > len(closest(small)):
                pending = (base, closest(small), list(left_out))
            row_sql = apply(base, chosen)
            left_out += [v.atom for v in chosen if v.atom not in left_out]
        else:
            if pending is not None:
                raise QueryRefused("condition_influence_below_k")
        return (row_sql, tuple(left_out)) if left_out else (bp.row_sql, ())

    def _run_dp(self, plan: Plan, snap: _Snapshot, catalog: Catalog, user: str, eps: float):
        dp = self.policy.disclosure.dp
        clamps: list[dict[int, tuple[float, float]]] = []
        for bp in plan.boundaries:
            if bp.unit:
                self._fast_path(bp, snap, catalog)  # refuses a view that is not person-unique, before any debit
            clamp = {}
            for j, agg in enumerate(bp.aggregates):
                if agg.kind in ("sum", "avg"):
                    if agg.bounds is None or agg.cls not in ("measure", "sensitive_measure"):
                        raise QueryRefused("dp_derived_measure", part=agg.node.sql("duckdb") if agg.node else "")
                    clamp[j] = agg.bounds
            clamps.append(clamp)
        period = ledger.current_period(dp.period)
        spent_eps = eps if plan.boundaries else 0.0
        remaining = None
        if spent_eps:
            try:
                remaining = ledger.debit(self.instance, user, period, spent_eps, dp.budget_per_period,
                                         plan.fingerprint)
            except ledger.BudgetExceeded:
                raise QueryRefused("budget_exhausted") from None
        else:
            remaining = max(dp.budget_per_period - ledger.spent(self.instance, user, period), 0.0)
        protected, stats = {}, []
        share = eps / max(len(plan.boundaries), 1)
        for bp, clamp in zip(plan.boundaries, clamps):
            fast = self._fast_path(bp, snap, catalog)
            if bp.unit:
                bounding, params = Bounding(max_groups=1, max_rows=1, clamp={}), DPParams(
                    epsilon=share, delta=dp.delta, max_rows=UNIT_DP_SENSITIVITY, max_groups=UNIT_DP_SENSITIVITY)
            else:
                bounding = Bounding(max_groups=dp.max_groups_per_person, max_rows=dp.max_rows_per_person,
                                    clamp=clamp)
                params = DPParams(epsilon=share, delta=dp.delta, max_rows=dp.max_rows_per_person,
                                  max_groups=dp.max_groups_per_person)
            cells = self._fetch(snap, cells_sql(bp, person_unique=fast, bounding=bounding, dominance=False))
            frame, st = protect_dp(cells, bp.aggregates, self._domains(bp), params, clamp)
            protected[bp.name] = self._to_arrow(frame, bp, snap)
            stats.append(st)
        table = self._post_process(plan, protected, snap, catalog)
        return table, stats, {"epsilon_spent": spent_eps, "epsilon_remaining": remaining}

    def _protected_schema(self, bp: BoundaryPlan, snap: _Snapshot) -> pa.Schema:
        cached = getattr(bp, "_schema", None)
        if cached is not None:
            return cached
        try:
            row_schema = snap.cursor().execute(f"SELECT * FROM ({bp.row_sql}) LIMIT 0").to_arrow_table().schema
        except duckdb.Error:
            raise QueryRefused("execution_failed") from None
        fields = [pa.field(f"__g{j}", row_schema.field(f"__g{j}").type) for j in range(len(bp.group_keys))]
        for j, agg in enumerate(bp.aggregates):
            fields.append(pa.field(f"__v{j}", pa.int64() if agg.kind in COUNT_KINDS else pa.float64()))
        schema = pa.schema(fields)
        object.__setattr__(bp, "_schema", schema)
        return schema

    def _to_arrow(self, frame: Cells, bp: BoundaryPlan, snap: _Snapshot) -> pa.Table:
        schema = self._protected_schema(bp, snap)
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

    def _empty_protected(self, bp: BoundaryPlan, snap: _Snapshot) -> pa.Table:
        return self._protected_schema(bp, snap).empty_table()

    def _post_process(self, plan: Plan, protected: dict[str, pa.Table], snap: _Snapshot, catalog: Catalog,
                      *, limit_zero: bool = False) -> pa.Table:
        """Run everything above the boundaries in a fresh in-memory DuckDB that holds only
        the protected tables and public views, with file and network access disabled."""
        if plan.passthrough is not None and not plan.public_views:
            table = protected[plan.boundaries[0].name]
            sources = [src for src, _ in plan.passthrough]
            table = table.select(sources).rename_columns([out for _, out in plan.passthrough])
            return table.slice(0, 0) if limit_zero else table
        con = self._post_connection()
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
                return con.execute(sql).to_arrow_table(ARROW_BATCH_ROWS)
            except duckdb.Error as exc:
                raise _execution_refusal(exc) from None
        finally:
            for name in registered:
                try:
                    con.unregister(name)
                except duckdb.Error:
                    pass

    def _post_connection(self) -> duckdb.DuckDBPyConnection:
        """This thread's sealed in-memory DuckDB for post-processing: no file or network
        access, configuration locked, no storage; it only ever holds the protected tables
        of the query being answered (registered, then unregistered)."""
        con = getattr(self._local, "post", None)
        if con is None:
            con = duckdb.connect(":memory:", config={"enable_external_access": False, "lock_configuration": True,
                                                     "threads": 1, "autoload_known_extensions": False,
                                                     "autoinstall_known_extensions": False})
            self._local.post = con
        return con

    # ---- reporting ------------------------------------------------------------------
    def _summary(self, mode: str, table: pa.Table, stats: list[ProtectionStats], eps_info: dict, plan: Plan,
                 conditions_left_out: list[str] = ()) -> dict:
        p = self.policy.disclosure.perturbation
        cells_suppressed = sum(s.cells_suppressed for s in stats)
        dominance = sum(s.values_suppressed_dominance for s in stats)
        notes = []
        if plan.public_only:
            notes.append("公開情報のみの集計です（保護処理は不要）。")
        elif mode == "threshold":
            notes.append(f"{self.policy.disclosure.k}人未満のセルは秘匿（空欄）しています。")
            if any(bp.unit for bp in plan.boundaries):
                notes.append(f"世帯単位の集計では、{self.policy.disclosure.k}世帯未満のセルを秘匿しています。")
            notes.append(f"件数にはセルキー法による小さな攪乱（±{p.max_noise}以内）を加えています。")
            if conditions_left_out:
                notes.append(f"対象者を{self.policy.disclosure.k}人以上変えない条件は適用していません"
                             f"（差分による特定の防止）: {'; '.join(conditions_left_out)}")
            if dominance:
                notes.append("少数の者が大部分を占める合計・平均は秘匿しています（優越性ルール）。")
            if any(not s.densified for s in stats) and any(bp.group_keys for bp in plan.boundaries):
                notes.append("公開された値域のない区分では、秘匿対象の区分は表示されません。")
        else:
            notes.append(f"差分プライバシーのノイズを加えています（ε = {eps_info['epsilon_spent']:g}）。")
        return {
            "mode": mode,
            "cells": int(sum(s.cells for s in stats)),
            "rows": table.num_rows,
            "cells_suppressed": int(cells_suppressed),
            "values_suppressed_dominance": int(dominance),
            "perturbation": ({"method": "cell-key", "max_noise": p.max_noise, "variance": p.variance}
                             if mode == "threshold" and not plan.public_only and p.enabled else
                             {"method": "dp", "count": "geometric", "sum": "snapping-laplace"}
                             if mode == "dp" and not plan.public_only else None),
            "epsilon_spent": eps_info["epsilon_spent"],
            "epsilon_remaining": eps_info["epsilon_remaining"],
            "query_id": None,
            "conditions_left_out": list(conditions_left_out),
            "notes_ja": notes,
        }

    def _audit_refusal(self, user, role, sql, fingerprint, views, mode, refusal: QueryRefused, started,
                       operator=None) -> None:
        details = {"sql": sql if isinstance(sql, str) else repr(sql)[:1000], "fingerprint": fingerprint,
                   "views": views, "mode": mode, "decision": "refused", "code": refusal.code,
                   "reason": refusal.reason, "part": refusal.part, "epsilon_spent": 0.0,
                   "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
        if operator:
            details["operator"] = operator
        self._audit_and_alert(
            dict(type="query.refused", user=str(user), role=role, outcome="refused",
                 summary=f"refused: {refusal.code}", details=details),
            dict(user=user, role=role, fingerprint=fingerprint, refused=True, cells=0)
            if role is not None else None)

    def _announce(self, user: str, role: str, sql: str, plan: Plan, mode: str, eps: float | None,
                  snap: _Snapshot, operator: str | None) -> Future:
        """Start writing the request's audit entry (``query.request``: who asked what of
        which snapshot) on the guard's audit thread, durable, while the query runs on the
        store. The answer waits for it; so a request is on record even if the guard
        crashes while executing it, and the fsync overlaps the execution."""
        details = {"sql": sql, "fingerprint": plan.fingerprint, "normalized": plan.normalized_sql,
                   "views": list(plan.views), "mode": mode, "snapshot": snap.id}
        if eps is not None:
            details["epsilon"] = eps
        if operator:
            details["operator"] = operator
        return self._executor("audit").submit(
            self.instance.audit.append, "query.request", user=user, role=role, outcome="ok",
            summary=f"{mode} query on {', '.join(plan.views) or '-'}: received", details=details)

    def _audit_and_alert(self, entry: dict, request: dict | None) -> dict:
        """Append the request's audit entry (durable before the caller answers), then hand
        the request to the guard's bookkeeping thread, which updates the alert counters and
        audits any alert raised. Alerts detect, they do not gate an answer, and their
        counters are already allowed to lose the last requests on a power cut (sqlite
        synchronous=NORMAL), so they stay off the answer's path; each alert entry names the
        entry that raised it (``raised_by``). ``flush`` waits for the thread."""
        appended = self.instance.audit.append(**entry)
        if request is not None:
            self._executor("bookkeeping").submit(self._bookkeep, dict(request, raised_by=appended["seq"]))
        return appended

    def flush(self) -> None:
        """Wait until every request answered so far is in the alert counters and its
        alerts are audited."""
        pool = self._pools.get("bookkeeping") if self._pools_pid == os.getpid() else None
        if pool is not None:
            pool.submit(lambda: None).result()

    def _bookkeep(self, request: dict) -> None:
        seq = request["raised_by"]
        try:
            self.instance.audit.sync()   # the outcome entry written just before, first
        except AuditError:
            log.exception("the audit entry %s could not be made durable", seq)
        user, role = request["user"], request["role"]
        try:
            found = self._record_request(**request)
            self._audit_alerts(found, user, role, seq)
            pairs = getattr(found, "pairs", ())
            if pairs:   # differencing: close sizes, verified on the store after the transaction
                verified, failure = self._verify_pairs(pairs)
                if verified:
                    self._audit_alerts(alert_rules.confirm_differencing(
                        self.instance, self.policy.disclosure.alerts, user=user, fingerprint=request["fingerprint"],
                        pairs=verified, raised_by=seq, pause=self._holds_apply(role)), user, role, seq)
                if failure is not None:
                    self._bookkeeping_failed(user, role, seq, failure, check="differencing")
        except Exception as exc:   # nobody waits for this thread: the failure goes to the trail
            self._bookkeeping_failed(user, role, seq, exc)

    def _audit_alerts(self, found: list[dict], user: str, role: str | None, seq: int) -> None:
        for alert in found:
            self.instance.audit.append("alert", user=user, role=role, outcome="ok",
                                       summary=f"guard alert: {alert['alert']}", details=dict(alert, raised_by=seq))

    def _bookkeeping_failed(self, user: str, role: str | None, seq: int, exc: Exception, *,
                            check: str | None = None) -> None:
        summary = ("guard alert bookkeeping failed; alerts for this request were not evaluated" if check is None
                   else f"guard alert bookkeeping failed; {check} pairs of this request were not all verified")
        details = {"raised_by": seq, "error": type(exc).__name__}
        if check is not None:
            details["check"] = check
        try:
            self.instance.audit.append("alert.bookkeeping_failed", user=user, role=role, outcome="failed",
                                       summary=summary, details=details)
        except Exception:
            log.exception("guard alert bookkeeping failed for audit entry %s and could not be audited", seq)

    def _verify_pairs(self, pairs) -> tuple[list, Exception | None]:
        """The close pairs whose contributors really differ by 1..k-1 (symmetric difference
        of their ``__pid`` sets on the store), and the first error met (a pair that could
        not be verified raises no alert; the caller audits the error)."""
        k = self.policy.disclosure.k
        verified, failure = [], None
        for pair in pairs:
            try:
                if 1 <= self._symmetric_difference(pair.new, pair.old, k) < k:
                    verified.append(pair)
            except Exception as exc:   # store errors (a pruned snapshot, ...): audited, not raised
                failure = failure or exc
        return verified, failure

    def _symmetric_difference(self, new, old, k: int) -> int:
        """Contributors in exactly one of two recorded populations, counted up to k: one
        query on their snapshot, or across an upload the older population's ``__pid`` set
        fetched from its snapshot (if it still exists) and compared on the newer one."""
        distinct = "SELECT DISTINCT __pid FROM ({}) AS __r"
        other = distinct.format(old.sql)
        table = None
        if old.snapshot != new.snapshot:
            with self._verification_cursor(old.snapshot) as cur:
                table = cur.execute(other).to_arrow_table()
            other = "SELECT __pid FROM __sekisho_old"
        sql = (f"WITH __a AS ({distinct.format(new.sql)}), __b AS ({other}) SELECT COUNT(*) FROM ("
               "(SELECT __pid FROM __a EXCEPT SELECT __pid FROM __b) UNION ALL "
               f"(SELECT __pid FROM __b EXCEPT SELECT __pid FROM __a) LIMIT {int(k)}) AS __d")
        with self._verification_cursor(new.snapshot) as cur:
            if table is not None:
                cur.register("__sekisho_old", table)
            return int(cur.execute(sql).fetchone()[0])

    @contextlib.contextmanager
    def _verification_cursor(self, sid: str):
        """A cursor on snapshot ``sid``: the guard's open connection if it is the current
        one, else the snapshot opened read-only through the store (StoreError if it is
        gone), with DuckDB's memory and threads limited; closed afterwards."""
        snap = self._snapshot
        if snap is not None and snap.id == sid:
            cur = snap.cursor()
            try:
                yield cur
            finally:
                cur.close()
            return
        con = self.store.connect(sid).con
        try:
            con.execute(f"SET memory_limit = '{VERIFY_MEMORY_LIMIT}'")
            con.execute(f"SET threads = {VERIFY_THREADS}")
            yield con
        finally:
            con.close()

    def _record_request(self, *, user: str, role: str | None, fingerprint: str, refused: bool, cells: int,
                        populations: list[tuple[int, int, str]] = (), raised_by: int | None = None) -> list[dict]:
        """Update the alert counters; an alert the policy pauses on puts ``user`` on hold
        (``raised_by``: the request's audit entry), from their next query on. Returns the
        alerts and (``.pairs``) the close populations ``_bookkeep`` verifies on the store
        before it raises ``differencing``."""
        return alert_rules.record_request(self.instance, self.policy.disclosure.alerts, user=user,
                                          fingerprint=fingerprint, refused=refused, cells=cells,
                                          populations=populations, k=self.policy.disclosure.k,
                                          raised_by=raised_by, pause=self._holds_apply(role))

    def _holds_apply(self, role: str | None) -> bool:
        role_def = self.policy.roles.get(role) if role else None
        return role_def is None or role_def.alert_holds

    def _executor(self, kind: str) -> ThreadPoolExecutor:
        """The guard's helper thread of one kind ("audit": request entries; "bookkeeping":
        outcome fsync and alerts), one per guard and process (a forked child starts its
        own). One thread each keeps their work in order."""
        if self._pools_pid != os.getpid():
            with self._lock:
                if self._pools_pid != os.getpid():
                    self._pools, self._pools_pid = {}, os.getpid()
        pool = self._pools.get(kind)
        if pool is None:
            with self._lock:
                pool = self._pools.get(kind)
                if pool is None:
                    pool = self._pools[kind] = ThreadPoolExecutor(max_workers=1,
                                                                  thread_name_prefix=f"sekisho-{kind}")
        return pool


__all__ = ["Guard", "GuardResult", "QueryRefused", "AuditError"]
