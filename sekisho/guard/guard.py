"""The guard: the only way to compute on person-level data.

``Guard.query`` is a composition of stages, each a module with one job:

1. ``session``    who is asking: role, hold, mode, ε (no data read);
2. ``planning``   parse once, analysis passes, rewrite into boundary row SELECTs and
                  post-processing (cached per user and snapshot);
3. ``limits``     the cells the plan can produce, estimated from the policy, under the cap;
4. ``recording``  the request's audit entry, made durable while the query runs;
5. ``limits``     admission to execution (fair share between users) and a deadline;
6. ``protection`` the mode's protection (``PROTECTIONS``: threshold with condition
                  influence, or DP with the budget debited first), which runs cells SQL
                  on the snapshot (``execution``) and post-processing on protected tables;
7. ``request_pairs`` (threshold) two parts of one query that are a differencing pair are
                  refused: from the text before 3, on the store after 6;
8. ``recording``  the outcome entry before the answer leaves; alerts after it.

Side channels: refusal texts are fixed per code; execution errors of the store are
reported as one generic refusal without the engine's message (which could quote a data
value); the only data-dependent refusals are ``filter_population_below_k``, decided on a
perturbed count, ``unit_view_not_person_unique``, a property of a whole view (one row
per person or not) that the policy's description of the view already states, and
``paused_for_review`` (a hold raised by a differencing/decomposition alert: one bit per
admin review, see ``sekisho.guard.alerts``). Timing is not equalised (residual risk, see
the threat model in ``sekisho.guard``); the caches that make a repeated query faster
(plans, condition-influence verdicts, DuckDB prepared statements) are per user, so
nothing one analyst asks makes another's faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sekisho.access import capabilities, load_policy_cached
from sekisho.audit import AuditError
from sekisho.guard import budget as ledger, request_pairs
from sekisho.guard import session as sessions
from sekisho.guard.catalog import Catalog, catalog_for_role
from sekisho.guard.errors import QueryRefused
from sekisho.guard.execution import PostProcessor, Snapshot, Snapshots, protected_schema, warm_up
from sekisho.guard.influence import VerdictCache
from sekisho.guard.limits import Admission, Cancel, Limits, cancellable, check_cells
from sekisho.guard.planning import PlanCache
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protection import PROTECTIONS, Context, summary
from sekisho.guard.recording import Recorder
from sekisho.instance import Instance
from sekisho.policy import Policy
from sekisho.store import Store


@dataclass
class GuardResult:
    table: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)
    # per-cell status and accuracy, row-aligned with ``table`` (format: ``sekisho.protocol``)
    cells: pa.Table | None = None


class Guard:
    def __init__(self, instance: Instance, *, policy: Policy | None = None):
        self.instance = instance
        self._fixed_policy = policy   # given: used as is; else the instance's, reloaded when it changes
        self.policy = policy or load_policy_cached(instance.policy_path)
        self.store = Store(instance)
        self.limits = Limits.from_config(instance.config)
        self.admission = Admission(self.limits.max_running, self.limits.max_running_per_user)
        self.plans = PlanCache()
        self.verdicts = VerdictCache()
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        self.snapshots = Snapshots(self.store, self.policy, instance.secret, self.limits,
                                   on_switch=self._forget_snapshot)
        self.post = PostProcessor(self.limits)
        self.recorder = Recorder(instance, self.policy, self.store, lambda: self.snapshots.snapshot)
        warm_up()   # the libraries' one-off costs, not the first query's

    def query(self, sql: str, *, user: str, mode: str | None = None, epsilon: float | None = None,
              operator: str | None = None, cancel: Cancel | None = None) -> GuardResult:
        """Answer ``sql`` for ``user`` (``operator``: who acts for them, e.g. root with --as).
        ``cancel``: the caller's handle to stop the query when its answer is no longer
        wanted (``Cancel.cancel()``, from any thread; the query ends as ``cancelled``)."""
        with self.recorder.attempt(sql, user, mode, operator) as attempt, cancellable(cancel):
            policy = self._policy_in_force()
            session = sessions.open_session(self.instance, policy, user, mode=mode, epsilon=epsilon,
                                            operator=operator)
            attempt.session(session)
            snap = self.snapshots.current()
            catalog = self._catalog(session.role, snap)
            plan = self.plans.plan(sql, user=user, role=session.role, snapshot=snap.id, catalog=catalog)
            attempt.planned(plan)
            check_cells(plan, catalog, self.limits)
            if session.mode == "threshold" and session.condition_influence:
                request_pairs.one_shape_each(plan)
            attempt.request = self.recorder.announce(session, sql, plan, snap.id)
            deadline = time.monotonic() + self.limits.query_seconds
            with self.admission.slot(user, deadline):
                released = PROTECTIONS[session.mode].release(Context(
                    policy, self.instance, session, plan, snap, catalog, self.post, self.verdicts, deadline))
            if session.mode == "threshold" and session.condition_influence and len(plan.boundaries) > 1:
                request_pairs.refuse_pairs_within(self.instance, policy, plan, released, snap, session,
                                                  attempt.request.result()["seq"], self.recorder.audit_alerts)
            answer = summary(policy, session.mode, plan, released)
            answer["query_id"] = self.recorder.answered(attempt, session, plan, released, answer)
        return GuardResult(table=released.table, summary=answer, cells=released.cells)

    def describe(self, sql: str, *, user: str) -> pa.Schema:
        """Result schema of ``sql`` without reading data or spending budget. Not audited:
        it reveals only what ``views`` already shows (names and types), and refusals
        here are the same static decisions ``query`` would audit."""
        role = sessions.role(self.instance, self._policy_in_force(), user)
        snap = self.snapshots.current()
        catalog = self._catalog(role, snap)
        plan = self.plans.plan(sql, user=user, role=role, snapshot=snap.id, catalog=catalog)
        protected = {bp.name: protected_schema(bp, snap, probe=True).empty_table() for bp in plan.boundaries}
        return self.post.run(plan, protected, snap, catalog, limit_zero=True).schema

    def views(self, user: str) -> dict[str, Any]:
        policy = self._policy_in_force()
        role = sessions.role(self.instance, policy, user)
        out = {}
        for vname in capabilities(policy, role).views:
            view = policy.views[vname]
            out[vname] = {"title": view.title_ja, "purpose": view.purpose, "public": view.public,
                          "columns": {c.name: {"type": c.type, "class": c.cls, "description": c.description_ja,
                                               **({"domain": list(c.domain)} if c.domain else {}),
                                               **({"bounds": list(c.bounds)} if c.bounds else {})}
                                      for c in view.columns.values()}}
            if view.unique_per_person:
                # with the person these columns identify a row (joins: fix them, docs/linked-analysis.md)
                out[vname]["unique_per_person"] = list(view.unique_per_person)
        return out

    def budget(self, user: str) -> dict[str, Any]:
        policy = self._policy_in_force()
        sessions.role(self.instance, policy, user)
        dp = policy.disclosure.dp
        period = ledger.current_period(dp.period)
        spent = ledger.spent(self.instance, user, period)
        return {"period": period, "total": dp.budget_per_period, "spent": spent,
                "remaining": max(dp.budget_per_period - spent, 0.0),
                "epsilon_per_query_min": dp.epsilon_per_query_min,
                "epsilon_per_query_max": dp.epsilon_per_query_max}

    @property
    def ptable(self) -> PerturbationTable:
        """The perturbation table of the current snapshot (for tests and tools; a query
        uses the table of the snapshot it runs on)."""
        return self.snapshots.current().ptable

    def flush(self) -> None:
        """Wait until every request answered so far is in the alert counters and its
        alerts are audited."""
        self.recorder.flush()

    def close(self) -> None:
        self.recorder.close()   # pending audit and alert bookkeeping finish first
        self.snapshots.close()

    def _catalog(self, role: str, snap: Snapshot) -> Catalog:
        key = (role, snap.id)
        cat = self._catalogs.get(key)
        if cat is None:
            cat = self._catalogs[key] = catalog_for_role(self.policy, role, snap.types)
        return cat

    def _policy_in_force(self) -> Policy:
        """The instance's policy as the file now says (one ``stat`` per call): after an
        edit the guard agrees with the services at the next query. A changed policy
        drops what was derived from the old one (catalogs, plans, verdicts, the
        snapshot's perturbation table)."""
        if self._fixed_policy is not None:
            return self._fixed_policy
        policy = load_policy_cached(self.instance.policy_path)
        if policy is not self.policy:
            self.policy = self.snapshots.policy = self.recorder.policy = policy
            self.snapshots.reopen()
            self._forget_snapshot()
        return policy

    def _forget_snapshot(self) -> None:
        """A new snapshot is current: what was cached about the old one goes."""
        self._catalogs.clear()
        self.plans.clear()
        self.verdicts.clear()


__all__ = ["Guard", "GuardResult", "QueryRefused", "AuditError", "Cancel"]
