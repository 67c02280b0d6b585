"""Stage 6 of a query: recording — the audit trail and the alert bookkeeping.

Once a query is planned, its request entry (``query.request``: user, SQL, fingerprint,
views, mode, snapshot) is made durable on the audit thread while the store executes it;
the answer waits for it, then the outcome entry (``query``, linked by ``request``) is
written and the answer leaves, the outcome's fsync and the alert bookkeeping following
on the bookkeeping thread. Any failure before the request entry is durable and the
outcome entry written releases nothing; a power cut can lose the outcome of the last
answers, never their request. A refusal is audited as ``query.refused``; an unexpected
error is logged with its traceback and audited as the refusal ``execution_failed``
(without its message, which could quote a data value).

Alerts detect, they do not gate an answer: the bookkeeping thread updates the counters
(``alerts.record_request``), verifies differencing pairs on the store, audits alerts
and puts a user on hold when the policy says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field


from sekisho.audit import AuditError
from sekisho.guard import alerts as alert_rules, cell_checks, regions, upload_regions
from sekisho.guard.errors import QueryRefused
from sekisho.guard.planning import refused_fingerprint
from sekisho.guard.rewrite import BoundaryPlan, Plan
from sekisho.guard.session import Session, holds_apply
from sekisho.guard.store_checks import StoreChecks
from sekisho.instance import Instance
from sekisho.policy import Policy
from sekisho.store import Store

log = logging.getLogger(__name__)


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


@dataclass
class Attempt:
    """What is known of a query so far, for its audit entry if it is refused."""
    sql: object
    user: object
    mode: str | None
    operator: str | None
    started: float = field(default_factory=time.perf_counter)
    role: str | None = None
    fingerprint: str = "unparsed"
    views: list[str] = field(default_factory=list)
    request: Future | None = None     # the request's audit entry, made durable while the query runs

    def session(self, session: Session) -> None:
        self.role, self.mode = session.role, session.mode

    def planned(self, plan: Plan) -> None:
        self.fingerprint, self.views = plan.fingerprint, list(plan.views)

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


class Recorder:
    """The guard's audit and alert bookkeeping, on two helper threads per process."""

    def __init__(self, instance: Instance, policy: Policy, store: Store, current_snapshot):
        self.instance = instance
        self.policy = policy
        self.store = store
        self._current_snapshot = current_snapshot   # () -> the guard's open Snapshot or None
        self._lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_pid = os.getpid()
        self.checks = StoreChecks(store, current_snapshot)

    @contextlib.contextmanager
    def attempt(self, sql: object, user: object, mode: str | None, operator: str | None):
        """Audit how a query ends if it does not end in an answer: a refusal as itself, an
        unexpected error (logged with its traceback) as ``execution_failed``; an audit
        failure is raised as it is (nothing is answered)."""
        attempt = Attempt(sql=sql, user=user, mode=mode, operator=operator)
        try:
            yield attempt
        except QueryRefused as refusal:
            _settle(attempt.request)
            self.refused(attempt, refusal)
            raise
        except AuditError:
            _settle(attempt.request, quiet=True)
            raise
        except Exception:
            _settle(attempt.request)
            refusal = QueryRefused("execution_failed")
            seq = self.refused(attempt, refusal)
            log.exception("query of %s failed unexpectedly (audit seq %s)", attempt.user, seq)
            raise refusal from None

    def announce(self, session: Session, sql: str, plan: Plan, snapshot: str) -> Future:
        """Start writing the request's audit entry (``query.request``: who asked what of
        which snapshot) on the audit thread, durable, while the query runs on the store.
        The answer waits for it; so a request is on record even if the guard crashes
        while executing it, and the fsync overlaps the execution."""
        details = {"sql": sql, "fingerprint": plan.fingerprint, "normalized": plan.normalized_sql,
                   "views": list(plan.views), "mode": session.mode, "snapshot": snapshot}
        if session.epsilon is not None:
            details["epsilon"] = session.epsilon
        if session.operator:
            details["operator"] = session.operator
        return self._executor("audit").submit(
            self.instance.audit.append, "query.request", user=session.user, role=session.role, outcome="ok",
            summary=f"{session.mode} query on {', '.join(plan.views) or '-'}: received", details=details)

    def refused(self, attempt: Attempt, refusal: QueryRefused) -> int | None:
        if attempt.fingerprint == "unparsed":
            attempt.fingerprint = refused_fingerprint(attempt.sql)
        sql = attempt.sql
        details = {"sql": sql if isinstance(sql, str) else repr(sql)[:1000], "fingerprint": attempt.fingerprint,
                   "views": attempt.views, "mode": attempt.mode, "decision": "refused", "code": refusal.code,
                   "reason": refusal.reason, "part": refusal.part, "epsilon_spent": 0.0,
                   "duration_ms": attempt.elapsed_ms()}
        if attempt.operator:
            details["operator"] = attempt.operator
        entry = self._audit_and_alert(
            dict(type="query.refused", user=str(attempt.user), role=attempt.role, outcome="refused",
                 summary=f"refused: {refusal.code}", details=details),
            dict(user=attempt.user, role=attempt.role, fingerprint=attempt.fingerprint, refused=True, cells=0)
            if attempt.role is not None else None)
        if refusal.code == "resource_limit":
            # a stop on time or memory can depend on the data: admins see every one
            self.instance.audit.append("alert", user=str(attempt.user), role=attempt.role, outcome="ok",
                                       summary="guard alert: resource_limit",
                                       details={"alert": "resource_limit", "fingerprint": attempt.fingerprint,
                                                "duration_ms": attempt.elapsed_ms(), "raised_by": entry.get("seq")})
        return entry.get("seq")

    def answered(self, attempt: Attempt, session: Session, plan: Plan, released, summary: dict) -> int:
        """Write the outcome entry (chained, sealed, readable) before the answer leaves;
        its fsync runs on the bookkeeping thread, as the request entry is already durable."""
        request_seq = attempt.request.result()["seq"]   # durable before anything leaves (AuditError: nothing)
        table, stats = released.table, released.stats
        details = {"sql": attempt.sql, "fingerprint": plan.fingerprint, "normalized": plan.normalized_sql,
                   "views": list(plan.views), "mode": session.mode, "decision": "allowed", "rows": table.num_rows,
                   "cells": summary["cells"], "cells_suppressed": summary["cells_suppressed"],
                   "values_suppressed_dominance": summary["values_suppressed_dominance"],
                   "rows_dropped_below_k": sum(s.rows_dropped for s in stats),
                   "conditions_left_out": released.left_out,
                   "conditions_left_out_as": released.treated_as,
                   "epsilon_spent": released.epsilon_spent,
                   "duration_ms": attempt.elapsed_ms(),
                   "request": request_seq}
        if session.operator:
            details["operator"] = session.operator
        populations = [(*s.population, _shape(plan.fingerprint, bp), *(d or ()))
                       for s, bp, d in zip(stats, plan.boundaries, released.defined) if s.population is not None]
        # the regions each release partitions (threshold mode: DP answers are noised per query)
        released_rows = [(d[0], d[1], len(bp.group_keys), keys, tree) for bp, d, keys, tree in
                         zip(plan.boundaries, released.defined, released.cell_keys, released.row_trees)
                         if d is not None and keys is not None]
        entry = self._audit_and_alert(
            dict(type="query", user=session.user, role=session.role, outcome="ok",
                 summary=f"{session.mode} query on {', '.join(plan.views) or '-'}: {table.num_rows} rows",
                 details=details, durable=False),
            dict(user=session.user, role=session.role, fingerprint=plan.fingerprint, refused=False,
                 cells=summary["cells"], populations=populations, released_rows=released_rows))
        return entry["seq"]

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
        user, role = request["user"], request.get("role")
        released_rows = request.pop("released_rows", ())
        try:
            found = self._record_request(**request)
            self.audit_alerts(found, user, role, seq)
            # close pairs, verified on the store after the transaction: within the window
            # (differencing) and across snapshots (upload_differencing; an old snapshot may
            # be gone: audited as a failed check)
            for check, pairs, confirm in (
                    ("differencing", getattr(found, "pairs", ()), alert_rules.confirm_differencing),
                    ("upload_differencing", getattr(found, "upload_pairs", ()),
                     alert_rules.confirm_upload_differencing)):
                if not pairs:
                    continue
                verified, failure = self.checks.verify_pairs(pairs, self.policy.disclosure.k)
                if verified:
                    self.audit_alerts(confirm(
                        self.instance, self.policy.disclosure.alerts, user=user, fingerprint=request["fingerprint"],
                        pairs=verified, raised_by=seq, pause=self._holds_apply(role)), user, role, seq)
                if failure is not None:
                    self._bookkeeping_failed(user, role, seq, failure, check=check)
            self._record_regions(released_rows, user, role, seq, request["fingerprint"])
            self._record_cells(released_rows, user, role, seq, request["fingerprint"])
        except Exception as exc:   # nobody waits for this thread: the failure goes to the trail
            self._bookkeeping_failed(user, role, seq, exc)
        finally:
            self.checks.forget_pruned()

    def _record_cells(self, released_rows, user: str, role: str | None, seq: int, fingerprint: str) -> None:
        """``differencing`` per cell (``cell_pairs``): record, check on the store, audit."""
        found, failure = cell_checks.check_releases(
            self.instance, self.policy.disclosure, released_rows, user=user, fingerprint=fingerprint,
            cursor=self.checks.cursor, current=getattr(self._current_snapshot(), "id", None), raised_by=seq,
            pause=self._holds_apply(role))
        self.audit_alerts(found, user, role, seq)
        if failure is not None:
            self._bookkeeping_failed(user, role, seq, failure, check="cell_differencing")

    def _record_regions(self, released_rows, user: str, role: str | None, seq: int, fingerprint: str) -> None:
        """``upload_decomposition``: record the partitions of the request's releases, check
        the classes averaged on two snapshots on the store, audit the alert."""
        by_snapshot: dict[str, list[upload_regions.RegionRelease]] = {}
        for snapshot, row_sql, keys, cell_keys, tree in released_rows:
            for part in regions.partitions(row_sql, regions.key_codes(cell_keys, keys), tree):
                by_snapshot.setdefault(snapshot, []).append(upload_regions.RegionRelease(
                    part.region_class, part.partition, part.weight, (row_sql, part.kept_keys, part.kept_conjuncts),
                    part.piece))
        alerts = self.policy.disclosure.alerts
        for snapshot, releases in by_snapshot.items():
            pairs = upload_regions.record_regions(self.instance, alerts, user=user, snapshot=snapshot,
                                                  releases=releases,
                                                  variance=self.policy.disclosure.perturbation.variance)
            checked, failure = [], None
            for pair in pairs:
                try:
                    checked.append((pair, upload_regions.region_changed(
                        pair, self.policy.disclosure.k, self.checks.cursor)))
                except Exception as exc:   # a pruned snapshot, ...: audited, not raised
                    failure = failure or exc
            self.audit_alerts(upload_regions.confirm_regions(
                self.instance, alerts, user=user, fingerprint=fingerprint, checked=checked, raised_by=seq,
                pause=self._holds_apply(role)), user, role, seq)
            if failure is not None:
                self._bookkeeping_failed(user, role, seq, failure, check="upload_decomposition")

    def audit_alerts(self, found: list[dict], user: str, role: str | None, seq: int) -> None:
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
        return holds_apply(self.policy, role)

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

    def close(self) -> None:
        """Let pending audit and alert bookkeeping finish (in this process's pools)."""
        with self._lock:
            pools, self._pools = self._pools, {}
        if self._pools_pid == os.getpid():
            for pool in pools.values():
                pool.shutdown(wait=True)
        self.checks.close()
