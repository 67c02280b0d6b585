"""The guard's stages on their own (issue 16): session and planning are tested without
constructing ``Guard``; and a query is parsed once, whatever the number of conditions
condition influence examines (trees travel between the stages, not SQL strings)."""

from __future__ import annotations

import math

import pytest
import sqlglot.parser

from guard_fixtures import make_instance
from sekisho.guard import Guard, QueryRefused
from sekisho.guard import planning, session
from sekisho.guard.catalog import catalog_for_role
from sekisho.guard.execution import Snapshots
from sekisho.guard.limits import Limits
from sekisho.guard.protection import PROTECTIONS
from sekisho.policy import load_instance_policy
from sekisho.state import set_role
from sekisho.store import Store

SQL = ("SELECT sex, COUNT(*) AS n FROM residents WHERE age >= 30 AND age < 60 AND is_current "
       "AND block IN ('灘', '姫路', '網干', '広畑') GROUP BY sex")


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return make_instance(tmp_path_factory.mktemp("stages") / "inst", persons=3000, seed=16)


@pytest.fixture(scope="module")
def policy(inst):
    return load_instance_policy(inst)


# ---- session ---------------------------------------------------------------------------------
def test_a_session_is_the_role_mode_and_epsilon(inst, policy):
    s = session.open_session(inst, policy, "ana")
    assert (s.user, s.role, s.mode, s.epsilon) == ("ana", "analyst", policy.roles["analyst"].default_mode, None)
    dp = session.open_session(inst, policy, "ana", mode="dp", epsilon=0.25)
    assert dp.mode == "dp" and dp.epsilon == 0.25
    assert session.open_session(inst, policy, "rep").holds is False   # the reports identity is never held


@pytest.mark.parametrize("user, kwargs, code", [
    ("nobody", {}, "unknown_user"),
    ("", {}, "unknown_user"),
    (None, {}, "unknown_user"),
    ("stew", {}, "role_has_no_views"),
    ("ana", {"mode": "raw"}, "mode_not_allowed"),
    ("ana", {"mode": "dp", "epsilon": math.nan}, "epsilon_invalid"),
    ("ana", {"mode": "dp", "epsilon": True}, "epsilon_invalid"),
    ("ana", {"mode": "dp", "epsilon": 5e-324}, "epsilon_invalid"),
    ("ana", {"mode": "dp", "epsilon": "0.5"}, "epsilon_invalid"),
    ("ana", {"mode": "dp", "epsilon": 1e9}, "epsilon_invalid"),
    ("ana", {"mode": "threshold", "epsilon": 0.5}, "epsilon_invalid"),   # ε is refused, not ignored
])
def test_a_session_refuses_before_any_sql_is_read(inst, policy, user, kwargs, code):
    with pytest.raises(QueryRefused) as info:
        session.open_session(inst, policy, user, **kwargs)
    assert info.value.code == code


def test_a_user_on_hold_gets_no_session(inst, policy):
    from sekisho.guard import alerts

    set_role(inst, "held", "analyst")
    alerts.put_hold(inst, "held", alert="differencing")
    try:
        with pytest.raises(QueryRefused) as info:
            session.open_session(inst, policy, "held")
        assert info.value.code == "paused_for_review"
    finally:
        alerts.resume(inst, "held")
    assert session.open_session(inst, policy, "held").role == "analyst"


# ---- planning ----------------------------------------------------------------------------------
def catalog(inst, policy):
    snaps = Snapshots(Store(inst), policy, inst.secret, Limits())
    try:
        return snaps.current().id, catalog_for_role(policy, "analyst", snaps.current().types)
    finally:
        snaps.close()


def test_plans_are_cached_per_user_and_snapshot(inst, policy):
    sid, cat = catalog(inst, policy)
    cache = planning.PlanCache(size=2)
    first = cache.plan(SQL, user="ana", role="analyst", snapshot=sid, catalog=cat)
    assert cache.plan(SQL, user="ana", role="analyst", snapshot=sid, catalog=cat) is first
    assert cache.plan(SQL, user="ana2", role="analyst", snapshot=sid, catalog=cat) is not first
    cache.plan(SQL, user="ana", role="analyst", snapshot="other", catalog=cat)
    assert len(cache) == 2 and [k[0] for k in cache.keys()] == ["ana2", "ana"]   # bounded, LRU


def test_planning_fails_closed(inst, policy):
    _, cat = catalog(inst, policy)
    with pytest.raises(QueryRefused) as info:
        planning.make_plan("SELECT person_id FROM residents", cat)
    assert info.value.code not in ("execution_failed",)
    assert planning.refused_fingerprint("SELECT 1 +") .startswith("raw:")
    assert planning.refused_fingerprint("SELECT age FROM residents WHERE age = 3") == \
        planning.refused_fingerprint("SELECT age FROM residents WHERE age = 4")   # literals masked


def test_protections_are_registered_by_mode_name(policy):
    assert set(PROTECTIONS) == {"threshold", "dp"}
    for role in policy.roles.values():
        assert set(role.modes) <= set(PROTECTIONS)


# ---- parsed once ---------------------------------------------------------------------------------
def test_a_query_is_parsed_at_most_twice(inst, monkeypatch):
    """Three filters and a 4-element IN: condition influence examines 7 atoms and ~14
    neighbours, yet the query's SQL is parsed once (the plan cache is empty: a new query)."""
    g = Guard(inst)
    try:
        g.query("SELECT COUNT(*) AS n FROM residents", user="ana")   # the snapshot is open
        parses = []
        original = sqlglot.parser.Parser.parse

        def counting(self, *args, **kwargs):
            parses.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(sqlglot.parser.Parser, "parse", counting)
        result = g.query(SQL, user="ana")
        assert result.table.num_rows == 2
        assert len(parses) <= 2, len(parses)
        parses.clear()
        g.query(SQL.replace("'灘', ", ""), user="ana2")   # another user, another query: parsed anew
        assert 1 <= len(parses) <= 2
    finally:
        g.close()


# ---- the policy in force ---------------------------------------------------------------------------
def test_the_guard_follows_an_edited_policy(tmp_path):
    """The services read the policy per request (``access.load_policy_cached``); the guard
    does too, so after an edit both apply the same k (before: the guard kept the policy
    it was started with)."""
    import re

    inst = make_instance(tmp_path / "inst", persons=1500, seed=3)
    g = Guard(inst)
    try:
        sql = "SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex"
        assert g.query(sql, user="ana").summary["notes_ja"][0].startswith("10人未満")
        text = inst.policy_path.read_text(encoding="utf-8")
        inst.policy_path.write_text(re.sub(r"(?m)^(  k:) 10\b", r"\1 15", text), encoding="utf-8")
        assert g.query(sql, user="ana").summary["notes_ja"][0].startswith("15人未満")
        inst.policy_path.write_text("disclosure: [", encoding="utf-8")    # a broken edit: refused, logged
        with pytest.raises(QueryRefused) as info:
            g.query(sql, user="ana")
        assert info.value.code == "execution_failed"
    finally:
        g.close()


# ---- what the ingest recorded -------------------------------------------------------------------
def test_one_row_per_person_is_recorded_by_the_ingest_and_read_by_the_guard(ingested_instance):
    """The guard's first query on a view used to count it (COUNT DISTINCT of the privacy
    unit, 150-250 ms at 530k); the ingest records the answer in the snapshot's metadata."""
    inst = ingested_instance.instance
    recorded = Store(inst).current().details["person_unique"]
    assert recorded["residents"] is True and recorded["movements"] is False
    policy = load_instance_policy(inst)
    snaps = Snapshots(Store(inst), policy, inst.secret, Limits())
    try:
        snap = snaps.current()
        assert snap.person_unique == recorded          # known before any query reads the view
        for view, unique in recorded.items():
            unit = next(c.name for c in policy.views[view].columns.values() if c.cls == "privacy_unit")
            rows, persons = snap.cursor().execute(
                f'SELECT COUNT(*), COUNT(DISTINCT "{unit}") FROM "{view}"').fetchone()
            assert unique == (rows == persons)
    finally:
        snaps.close()
