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
from sekisho.instance import Instance
from sekisho.policy import Policy
from sekisho.store import Store

log = logging.getLogger(__name__)

# a snapshot the bookkeeping opens to verify a differencing pair (not the guard's current one)
VERIFY_MEMORY_LIMIT = "512MB"
VERIFY_THREADS = 1


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


_DISTINCT_PIDS = "SELECT DISTINCT __pid FROM ({}) AS __r"


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
        self._older = None   # (snapshot, pid, connection): ``_older_connection``

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
                verified, failure = self._verify_pairs(pairs)
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
            self._forget_pruned_older()

    def _forget_pruned_older(self) -> None:
        # a pruned snapshot's file is freed only once no connection holds it open
        kept = self._older
        if kept is not None and kept[1] == os.getpid() and not (self.store.snapshots_dir / kept[0]).exists():
            with self._lock:
                kept, self._older = self._older, None
            if kept is not None:
                kept[2].close()

    def _record_cells(self, released_rows, user: str, role: str | None, seq: int, fingerprint: str) -> None:
        """``differencing`` per cell (``cell_pairs``): record, check on the store, audit."""
        found, failure = cell_checks.check_releases(
            self.instance, self.policy.disclosure, released_rows, user=user, fingerprint=fingerprint,
            cursor=self._verification_cursor, current=getattr(self._current_snapshot(), "id", None), raised_by=seq,
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
                        pair, self.policy.disclosure.k, self._verification_cursor)))
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

    def _verify_pairs(self, pairs) -> tuple[list, Exception | None]:
        """The close pairs whose contributors really differ by 1..k-1 (symmetric difference
        of their ``__pid`` sets on the store), and the first error met (a pair that could
        not be verified raises no alert; the caller audits the error). Across an upload
        the older populations' ``__pid`` sets are fetched first, each older snapshot opened
        once per request (a request pairs with several populations of one snapshot)."""
        k = self.policy.disclosure.k
        verified, failure = [], None
        older, missing = self._older_populations(pairs)
        for pair in pairs:
            key = (pair.old.snapshot, pair.old.sql)
            if key in missing:
                failure = failure or missing[key]
                continue
            try:
                if 1 <= self._symmetric_difference(pair.new, pair.old, k, older.get(key)) < k:
                    verified.append(pair)
            except Exception as exc:   # store errors (a pruned snapshot, ...): audited, not raised
                failure = failure or exc
        return verified, failure

    def _older_populations(self, pairs) -> tuple[dict, dict]:
        """The ``__pid`` sets (Arrow tables) of the pairs' older populations recorded on
        another snapshot than the newer one's, by (snapshot, SQL); and the store errors of
        those that could not be fetched (a pruned snapshot, ...)."""
        wanted: dict[str, set[str]] = {}
        for pair in pairs:
            if pair.old.snapshot != pair.new.snapshot:
                wanted.setdefault(pair.old.snapshot, set()).add(pair.old.sql)
        tables, missing = {}, {}
        for sid, sqls in wanted.items():
            try:
                with self._verification_cursor(sid) as cur:
                    for sql in sorted(sqls):
                        tables[(sid, sql)] = cur.execute(_DISTINCT_PIDS.format(sql)).to_arrow_table()
            except Exception as exc:
                missing.update({(sid, sql): exc for sql in sqls if (sid, sql) not in tables})
        return tables, missing

    def _symmetric_difference(self, new, old, k: int, old_table=None) -> int:
        """Contributors in exactly one of two recorded populations, counted up to k: one
        query on their snapshot, or across an upload against the older population's
        ``__pid`` set fetched from its snapshot (``old_table``) on the newer one."""
        other = _DISTINCT_PIDS.format(old.sql)
        if old.snapshot != new.snapshot:
            if old_table is None:
                raise ValueError("an older population's persons are needed to compare across an upload")
            other = "SELECT __pid FROM __sekisho_old"
        sql = (f"WITH __a AS ({_DISTINCT_PIDS.format(new.sql)}), __b AS ({other}) SELECT COUNT(*) FROM ("
               "(SELECT __pid FROM __a EXCEPT SELECT __pid FROM __b) UNION ALL "
               f"(SELECT __pid FROM __b EXCEPT SELECT __pid FROM __a) LIMIT {int(k)}) AS __d")
        with self._verification_cursor(new.snapshot) as cur:
            if old.snapshot != new.snapshot:
                cur.register("__sekisho_old", old_table)
            return int(cur.execute(sql).fetchone()[0])

    @contextlib.contextmanager
    def _verification_cursor(self, sid: str):
        """A cursor on snapshot ``sid``: the guard's open connection if it is the current
        one, else the snapshot opened read-only through the store (StoreError if it is
        gone), with DuckDB's memory and threads limited; closed afterwards."""
        snap = self._current_snapshot()
        if snap is not None and snap.id == sid:
            cur = snap.cursor()
            try:
                yield cur
            finally:
                cur.close()
            return
        cur = self._older_connection(sid).cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _older_connection(self, sid: str):
        """A read-only connection on an older snapshot, kept open for the next request (the
        bookkeeping compares a request with populations of one older snapshot, and opening
        one takes ~20 ms): one at a time, of this process, and not once the snapshot is
        pruned (StoreError, as when it is opened)."""
        with self._lock:
            kept, self._older = self._older, None
        if kept is not None and (kept[0], kept[1]) == (sid, os.getpid()) and (self.store.snapshots_dir / sid).exists():
            with self._lock:
                self._older = kept
            return kept[2]
        if kept is not None and kept[1] == os.getpid():
            kept[2].close()
        con = self.store.connect(sid).con
        try:
            con.execute(f"SET memory_limit = '{VERIFY_MEMORY_LIMIT}'")
            con.execute(f"SET threads = {VERIFY_THREADS}")
        except Exception:
            con.close()
            raise
        with self._lock:
            self._older = (sid, os.getpid(), con)
        return con

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
        with self._lock:
            kept, self._older = self._older, None
        if kept is not None and kept[1] == os.getpid():
            kept[2].close()
