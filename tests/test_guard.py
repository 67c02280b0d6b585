"""The guard: analysis passes one by one, the threshold and DP protections, the audit,
the budget ledger, alerts, describe and the CLI — on GUARD's small planted store."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import sqlglot

from guard_fixtures import BANDS, BLOCKS, truth
from sekisho.audit import AuditError
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.catalog import catalog_for_role
from sekisho.guard.checks import check_functions, check_tables
from sekisho.guard.names import inline_ctes, qualify_columns
from sekisho.guard.protect.cellkey import PerturbationTable, noise_distribution
from sekisho.guard.protect.dominance import nk_fails, p_percent_fails
from sekisho.guard.sqltext import parse_single_select
from sekisho.policy import load_instance_policy
from sekisho.store import Store


# ``inst`` is the shared city and ``guard`` a guard over it (conftest.py); the tests that
# change roles, raise alerts, exhaust a budget or read the audit trail's last entries (which
# another module's queries on the shared city could have moved) run on ``own_city``


@pytest.fixture(scope="module")
def catalog(inst):
    return catalog_for_role(load_instance_policy(inst), "analyst")


def refused(guard, sql, **kw) -> QueryRefused:
    with pytest.raises(QueryRefused) as info:
        guard.query(sql, user=kw.pop("user", "ana"), **kw)
    return info.value


# ---- passes, each alone -------------------------------------------------------------
@pytest.mark.parametrize("sql, code", [
    ("", "empty_query"),
    ("SELECT 1; SELECT 2", "multiple_statements"),
    ("COPY residents TO '/tmp/x.csv'", "not_a_select"),
    ("ATTACH '/tmp/x.duckdb'", "not_a_select"),
    ("PRAGMA database_list", "not_a_select"),
    ("INSTALL httpfs", "not_a_select"),
    ("SET threads = 1", "not_a_select"),
    ("SELEC block FROM", "parse_error"),
])
def test_parse_single_select_refuses(sql, code):
    with pytest.raises(QueryRefused) as info:
        parse_single_select(sql)
    assert info.value.code == code


@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) FROM read_csv('/etc/passwd')",
    "SELECT getenv('HOME')",
    "SELECT random()",
    "SELECT current_setting('threads')",
    "SELECT my_udf(block) FROM residents",
    "SELECT COUNT(*) FROM residents WHERE block = (SELECT version())",
])
def test_check_functions_refuses_outside_allow_list(sql, catalog):
    tree = parse_single_select(sql)
    with pytest.raises(QueryRefused) as info:
        check_functions(tree, catalog)
    assert info.value.code == "function_not_allowed"


@pytest.mark.parametrize("sql, code", [
    ("SELECT COUNT(*) FROM '/etc/passwd'", "unknown_view"),
    ("SELECT COUNT(*) FROM main.residents", "unknown_view"),
    ("SELECT COUNT(*) FROM information_schema.tables", "unknown_view"),
    ("SELECT COUNT(*) FROM duckdb_tables()", "table_function"),
])
def test_check_tables(sql, code, catalog):
    tree = parse_single_select(sql)
    with pytest.raises(QueryRefused) as info:
        check_tables(tree, catalog)
    assert info.value.code == code


def test_qualify_hides_record_key(catalog):
    tree = parse_single_select("SELECT _rkey, COUNT(*) FROM residents GROUP BY 1")
    with pytest.raises(QueryRefused) as info:
        qualify_columns(tree, catalog)
    assert info.value.code == "unknown_column"


def test_inline_ctes_turns_ctes_into_derived_tables(catalog):
    tree = parse_single_select(
        "WITH a AS (SELECT block FROM residents), b AS (SELECT * FROM a) SELECT block, COUNT(*) FROM b GROUP BY 1")
    tree = inline_ctes(qualify_columns(tree, catalog), catalog)
    assert not list(tree.find_all(sqlglot.exp.With))
    assert [t.name for t in tree.find_all(sqlglot.exp.Table)] == ["residents"]


@pytest.mark.parametrize("sql, code", [
    ("SELECT * FROM residents", "row_level_output"),
    ("SELECT block, age FROM residents WHERE age > 99", "row_level_output"),
    ("SELECT DISTINCT block FROM residents", "distinct_rows"),
    ("SELECT COUNT(*) FROM residents WHERE person_id = 'p0000001'", "privacy_unit_in_filter"),
    ("SELECT household_id, COUNT(*) FROM residents GROUP BY 1", "row_level_output"),
    ("SELECT COUNT(*) FROM resident_tax WHERE taxable_income > 10000000", "measure_in_filter"),
    ("SELECT MIN(age) FROM residents", "aggregate_not_allowed"),
    ("SELECT MAX(taxable_income) FROM resident_tax", "aggregate_not_allowed"),
    ("SELECT MEDIAN(taxable_income) FROM resident_tax", "aggregate_not_allowed"),
    ("SELECT QUANTILE(age, 0.5) FROM residents", "aggregate_not_allowed"),
    ("SELECT LIST(person_id) FROM residents", "aggregate_not_allowed"),
    ("SELECT STRING_AGG(block, ',') FROM residents", "aggregate_not_allowed"),
    ("SELECT ANY_VALUE(chome_code) FROM residents", "aggregate_not_allowed"),
    ("SELECT COUNT(DISTINCT age) FROM residents", "aggregate_argument_not_allowed"),
    ("SELECT SUM(age) FROM residents", "aggregate_argument_not_allowed"),
    ("SELECT COUNT(DISTINCT household_id) FILTER (WHERE sex = '女') FROM residents", "aggregate_filter"),   # COUNT(*) FILTER is a conditional count (sekisho.guard.idioms)
    ("SELECT block, COUNT(*) FROM residents GROUP BY ROLLUP (block)", "grouping_sets"),
    ("SELECT block, COUNT(*) FROM residents GROUP BY CUBE (block)", "grouping_sets"),
    ("SELECT COUNT(*) FROM residents WHERE block IN (SELECT block FROM facilities)", "subquery_in_expression"),
    ("SELECT COUNT(*) FROM residents r WHERE EXISTS (SELECT 1 FROM facilities f WHERE f.block = r.block)",
     "subquery_in_expression"),
    ("SELECT COUNT(*) FROM (SELECT block FROM residents UNION ALL SELECT block FROM residents)",
     "set_operation_below_boundary"),
    ("SELECT COUNT(*) FROM (SELECT block, ROW_NUMBER() OVER () AS r FROM residents) WHERE r = 1",
     "window_below_boundary"),
    ("SELECT COUNT(*) FROM (SELECT * FROM residents ORDER BY age DESC LIMIT 1)", "limit_below_boundary"),
    ("SELECT COUNT(*) FROM residents r JOIN resident_tax t ON r.block = t.block", "personal_join"),
    ("SELECT COUNT(*) FROM facilities f RIGHT JOIN residents r ON r.block = f.block", "join_not_allowed"),
    ("SELECT COUNT(*) FROM residents TABLESAMPLE 10%", "syntax_not_allowed"),
    ("SELECT COUNT(*) FROM residents WHERE block = ?", "parameter_placeholder"),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r", "recursive_cte"),
    ("SELECT COUNT(*) FROM residents WHERE chome_code = '2820149999'", "filter_population_below_k"),
])
def test_refusals(guard, sql, code):
    assert refused(guard, sql).code == code


def test_refusal_names_the_part_and_never_data(guard):
    r = refused(guard, "SELECT block, MIN(age) FROM residents GROUP BY 1")
    assert "MIN" in r.part
    small = refused(guard, "SELECT COUNT(*) FROM residents WHERE chome_code = '2820149999'")
    empty = refused(guard, "SELECT COUNT(*) FROM residents WHERE chome_code = 'nowhere'")
    assert small.reason == empty.reason and small.code == empty.code
    assert not any(ch.isdigit() for ch in small.reason)


def test_unknown_user_and_roles_without_views(guard):
    assert refused(guard, "SELECT COUNT(*) FROM residents", user="mallory").code == "unknown_user"
    assert refused(guard, "SELECT COUNT(*) FROM residents", user="stew").code == "role_has_no_views"
    assert refused(guard, "SELECT COUNT(*) FROM residents", user="rep", mode="dp", epsilon=0.1).code == \
        "mode_not_allowed"


def test_a_role_change_applies_to_the_very_next_query(own_city):
    # one guard, many requests: a change of role must apply to the next request, with
    # nothing answered or recorded under the old role (no role is cached across requests)
    from sekisho.state import remove_user, set_role

    set_role(own_city, "mover", "analyst")
    g = Guard(own_city)
    try:
        sql = "SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex"
        assert g.query(sql, user="mover").table.num_rows == 2
        before = own_city.audit.head()[0]
        set_role(own_city, "mover", "steward")             # no views any more
        assert refused(g, sql, user="mover").code == "role_has_no_views"
        new = [e for e in own_city.audit.entries(user="mover") if e["seq"] > before]
        # (a refusal decided by the role lookup itself records no role, as before)
        assert [(e["type"], e["details"]["code"]) for e in new] == [("query.refused", "role_has_no_views")]
        set_role(own_city, "mover", "reports")             # threshold only: DP refused
        assert refused(g, sql, user="mover", mode="dp", epsilon=0.1).code == "mode_not_allowed"
        assert g.query(sql, user="mover").summary["mode"] == "threshold"
        set_role(own_city, "mover", "analyst")             # a refusal under the old role is not kept
        assert g.query(sql, user="mover", mode="dp", epsilon=0.1).summary["mode"] == "dp"
        before = own_city.audit.head()[0]
        remove_user(own_city, "mover")
        assert refused(g, sql, user="mover").code == "unknown_user"
        new = [e for e in own_city.audit.entries(user="mover") if e["seq"] > before]
        assert [(e["type"], e["role"]) for e in new] == [("query.refused", None)]
        set_role(own_city, "mover", "analyst")
        g.query(sql, user="mover")
        before = own_city.audit.head()[0]
        set_role(own_city, "mover", "reports")             # answered: recorded under the new role
        g.query(sql, user="mover")
        g.flush()
        new = [e for e in own_city.audit.entries(user="mover") if e["seq"] > before]
        assert {(e["type"], e["role"]) for e in new} == {("query.request", "reports"), ("query", "reports")}
    finally:
        g.close()


def test_public_views_are_answered_as_is(guard, inst):
    r = guard.query("SELECT facility_id, capacity_1 FROM facilities ORDER BY facility_id", user="ana")
    assert r.table.num_rows == len(truth(inst, "SELECT * FROM facilities"))
    assert r.table.column("capacity_1").to_pylist()[:2] == [10, 11]


# ---- threshold mode -------------------------------------------------------------------------
def test_exactly_the_cells_below_k_are_suppressed(guard, inst):
    r = guard.query("SELECT block, age_band, COUNT(*) AS n FROM residents GROUP BY 1, 2", user="ana")
    true = {(b, a): n for b, a, n in truth(inst, "SELECT block, age_band, COUNT(DISTINCT person_id) "
                                                 "FROM residents GROUP BY 1, 2")}
    rows = r.table.to_pylist()
    assert len(rows) == len(BLOCKS) * len(BANDS)  # densified to the public domains
    k = 10
    for row in rows:
        n_true = true.get((row["block"], row["age_band"]), 0)
        assert (row["n"] is None) == (n_true < k), (row, n_true)
        if row["n"] is not None:
            assert abs(row["n"] - n_true) <= guard.ptable.max_noise
    assert r.summary["cells_suppressed"] == sum(1 for row in rows if row["n"] is None)


def test_output_never_carries_keys(guard):
    r = guard.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block", user="ana")
    assert r.table.column_names == ["block", "n"]
    assert not any(name.startswith("__") or "rkey" in name for name in r.table.column_names)
    assert set(r.summary) >= {"mode", "cells", "cells_suppressed", "perturbation", "epsilon_spent",
                              "epsilon_remaining", "query_id", "notes_ja"}


def test_groups_without_public_domain_drop_rare_groups(guard, inst):
    r = guard.query("SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY 1", user="ana")
    codes = set(r.table.column("chome_code").to_pylist())
    assert "2820149999" not in codes
    assert None not in r.table.column("n").to_pylist()
    assert r.summary["cells_suppressed"] == 0  # the number of dropped groups is not revealed


def test_dominance_suppresses_a_dominated_sum(guard):
    r = guard.query("SELECT block, SUM(taxable_income) AS s, AVG(taxable_income) AS m, COUNT(*) AS n "
                    "FROM resident_tax WHERE tax_year = 2025 GROUP BY block", user="ana")
    rows = {row["block"]: row for row in r.table.to_pylist()}
    assert rows["安富"]["s"] is None and rows["安富"]["m"] is None and rows["安富"]["n"] is not None
    assert rows["家島"]["s"] is not None
    assert r.summary["values_suppressed_dominance"] >= 1


def test_dominance_rules():
    assert nk_fails([100], [60], [35]).all()          # two hold 95 %
    assert not nk_fails([100], [30], [20]).any()
    assert p_percent_fails([100], [95], [1]).all()    # remainder 4 < 9.5
    assert not p_percent_fails([100], [20], [20]).any()


def test_perturbation_table_is_zero_mean_bounded_and_keyed():
    dist = noise_distribution(2, 1.0)
    assert abs(sum(v * p for v, p in dist.items())) < 1e-9
    assert abs(sum(v * v * p for v, p in dist.items()) - 1.0) < 0.01
    t1 = PerturbationTable(b"a" * 32, max_noise=2, variance=1.0)
    t2 = PerturbationTable(b"b" * 32, max_noise=2, variance=1.0)
    assert t1.count_table.min() >= -2 and t1.count_table.max() <= 2
    assert abs(t1.count_table.mean()) < 0.05
    assert (t1.count_table != t2.count_table).any()


def test_decisions_draw_noise_independent_of_what_is_released():
    # the guard's decisions (``decision_counts``) follow the release noise's distribution
    # from a table of its own: for the cells released at k or more, whether the decision
    # falls below k is not known in advance (on the release's noise it never would)
    import numpy as np

    t = PerturbationTable(b"a" * 32, max_noise=5, variance=9.0, snapshot="s1")
    keys = np.arange(256)
    for count in (10, 12, 14):
        counts = np.full(256, count)
        released, decided = t.perturb_counts(keys, counts), t.decision_counts(keys, counts)
        assert sorted(decided - counts) == sorted(released - counts)   # one distribution
        below = decided[released >= 10] < 10
        assert 0 < below.mean() < 0.6, (count, below.mean())
        assert (t.decision_counts(keys, counts) == decided).all()        # consistent per cell


def test_same_contributors_same_noise_across_query_text(guard):
    a = guard.query("SELECT COUNT(*) AS n FROM residents WHERE age >= 65", user="ana").table.to_pylist()
    b = guard.query("SELECT COUNT(person_id) AS n FROM (SELECT * FROM residents WHERE NOT age < 65) t",
                    user="ana").table.to_pylist()
    c = guard.query("WITH old AS (SELECT * FROM residents WHERE age > 64) "
                    "SELECT COUNT(DISTINCT person_id) AS n FROM old", user="ana").table.to_pylist()
    assert a == b == c


def test_post_processing_sees_only_protected_values(guard):
    r = guard.query("SELECT SUM(n) AS total, MAX(n) AS top FROM (SELECT block, COUNT(*) AS n FROM residents "
                    "GROUP BY block) t", user="ana")
    blocks = guard.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block", user="ana")
    released = [v for v in blocks.table.column("n").to_pylist() if v is not None]
    assert r.table.to_pylist() == [{"total": sum(released), "top": max(released)}]


def test_join_of_aggregates_with_public_view(guard):
    r = guard.query("SELECT a.block, a.n, b.cap, a.n / b.cap AS ratio FROM (SELECT block, COUNT(*) AS n FROM "
                    "residents GROUP BY block) a JOIN (SELECT block, SUM(capacity_1) AS cap FROM facilities "
                    "GROUP BY block) b ON a.block = b.block ORDER BY a.block", user="ana")
    assert r.table.num_rows == 13 and r.table.column_names == ["block", "n", "cap", "ratio"]


# ---- DP mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0, -1, 1e20, float("nan"), float("inf"), 1.0000001, None, "0.5x", True])
def test_epsilon_validation(guard, eps):
    assert refused(guard, "SELECT COUNT(*) FROM residents", mode="dp", epsilon=eps).code == "epsilon_invalid"


def test_dp_debits_before_answer_and_persists(inst):
    g1 = Guard(inst)
    before = g1.budget("ana2")["spent"]
    r = g1.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana2", mode="dp", epsilon=0.5)
    assert r.summary["epsilon_spent"] == 0.5
    g1.close()
    g2 = Guard(inst)  # a restart / new session
    assert g2.budget("ana2")["spent"] == pytest.approx(before + 0.5)
    # a different view draws on the same budget
    g2.query("SELECT idou_type, COUNT(*) AS n FROM movements GROUP BY 1", user="ana2", mode="dp", epsilon=1.0)
    assert g2.budget("ana2")["spent"] == pytest.approx(before + 1.5)


def test_sum_of_derived_measure_refused_in_both_modes(guard):
    # arithmetic on a measure is refused by the row-level language before any mode applies
    # (it was dp_derived_measure in DP mode only; threshold mode summed it)
    assert refused(guard, "SELECT SUM(taxable_income * 2) FROM resident_tax", mode="dp", epsilon=0.1).code == \
        "measure_arithmetic"
    assert refused(guard, "SELECT SUM(taxable_income % 1000) FROM resident_tax").code == "measure_arithmetic"


def test_dp_public_domains_are_densified(guard):
    r = guard.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block", user="ana", mode="dp", epsilon=0.2)
    assert sorted(r.table.column("block").to_pylist()) == sorted(BLOCKS)


# ---- audit, alerts ---------------------------------------------------------------------------
def test_every_request_is_audited(guard, inst):
    ok = guard.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
    entry = [e for e in inst.audit.entries(type="query") if e["seq"] == ok.summary["query_id"]][0]
    d = entry["details"]
    assert entry["user"] == "ana" and entry["role"] == "analyst" and entry["outcome"] == "ok"
    for key in ("sql", "fingerprint", "views", "mode", "decision", "rows", "cells", "cells_suppressed",
                "epsilon_spent", "duration_ms"):
        assert key in d
    # the request was recorded before the answer: who asked what of which snapshot
    request = [e for e in inst.audit.entries(type="query.request") if e["seq"] == d["request"]][0]
    assert request["seq"] < entry["seq"] and request["user"] == "ana" and request["role"] == "analyst"
    assert request["details"]["sql"] == d["sql"] and request["details"]["fingerprint"] == d["fingerprint"]
    assert request["details"]["snapshot"] == Store(inst).current_id()
    refused(guard, "SELECT MIN(age) FROM residents")
    last = list(inst.audit.entries(type="query.refused"))[-1]
    assert last["details"]["code"] == "aggregate_not_allowed" and last["outcome"] == "refused"


@pytest.mark.parametrize("failing", ["query.request", "query"])
def test_no_answer_when_audit_fails(inst, monkeypatch, failing):
    """Neither the request entry (written while the query runs) nor the outcome entry
    can fail without the answer being withheld."""
    g = Guard(inst)
    append = inst.audit.append

    def broken(type, **k):
        if type == failing:
            raise AuditError("disk full")
        return append(type, **k)
    monkeypatch.setattr(inst.audit, "append", broken)
    with pytest.raises(AuditError):
        g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
    g.close()


def test_a_request_refused_while_running_is_recorded_before_its_refusal(own_city):
    g = Guard(own_city)
    with pytest.raises(QueryRefused) as info:
        g.query("SELECT COUNT(*) AS n FROM residents WHERE block = '家島' AND age_band = '100+'", user="ana")
    assert info.value.code == "filter_population_below_k"
    tail = list(own_city.audit.entries())[-2:]
    assert [e["type"] for e in tail] == ["query.request", "query.refused"]
    assert tail[0]["details"]["sql"] == tail[1]["details"]["sql"]
    g.close()


def test_the_outcome_entry_is_durable_and_sealed_by_the_head_after_flush(own_city):
    g = Guard(own_city)
    r = g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
    g.flush()   # the bookkeeping thread has fsync'd the outcome and recorded the head
    head = own_city.audit._read_head()
    assert head.seq == r.summary["query_id"]
    assert own_city.audit.verify().ok
    g.close()


def test_near_duplicate_burst_raises_an_alert(own_city):
    g = Guard(own_city)
    policy = load_instance_policy(own_city)
    burst = policy.disclosure.alerts.near_duplicate_burst
    before = len(list(own_city.audit.entries(type="alert")))
    earlier = len([e for e in own_city.audit.entries(type="query", user="ana2") if e["type"] == "query"])
    for i in range(burst):
        g.query(f"SELECT COUNT(*) AS n FROM residents WHERE age >= {i}", user="ana2")
    g.flush()   # alerts are evaluated on the guard's bookkeeping thread, after the answer
    alerts = list(own_city.audit.entries(type="alert"))[before:]
    raised = [a for a in alerts if a["details"]["alert"] == "near_duplicate"]
    assert len(raised) == 1
    # the alert names the audit entry of the request that raised it: the burst-th query
    answered = [e for e in own_city.audit.entries(type="query", user="ana2") if e["type"] == "query"]
    trigger = answered[earlier + burst - 1]
    assert raised[0]["details"]["raised_by"] == trigger["seq"] and raised[0]["seq"] > trigger["seq"]


def test_alert_bookkeeping_failure_is_audited_and_the_answer_stands(own_city, monkeypatch):
    from sekisho.guard import alerts as alert_rules

    def broken(*a, **k):
        raise RuntimeError("database is locked")
    monkeypatch.setattr(alert_rules, "record_request", broken)
    g = Guard(own_city)
    result = g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
    g.close()   # drains the bookkeeping thread
    failed = list(own_city.audit.entries(type="alert.bookkeeping_failed"))[-1]
    assert failed["details"] == {"raised_by": result.summary["query_id"], "error": "RuntimeError"}
    assert failed["user"] == "ana" and failed["outcome"] == "failed"


def test_close_finishes_pending_alert_bookkeeping(inst):
    g = Guard(inst)
    seen = []
    original = g.recorder._record_request

    def slow(**request):
        time.sleep(0.2)
        seen.append(request["fingerprint"])
        return original(**request)
    g.recorder._record_request = slow
    g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
    assert not seen                 # the answer did not wait for the bookkeeping ...
    g.close()
    assert len(seen) == 1           # ... and closing the guard waited for it


# ---- fetching --------------------------------------------------------------------------------
BATCHING_QUERIES = [
    "SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2, 3",          # densified
    "SELECT chome_code, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2",                  # rare groups dropped
    "SELECT age, COUNT(*) AS n FROM residents WHERE block = '飾磨' GROUP BY age",           # population check
    "SELECT CASE WHEN age >= 65 THEN '65+' ELSE '<65' END AS g, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2",
    ("SELECT block, SUM(taxable_income) AS s, AVG(taxable_income) AS m, COUNT(*) AS n "
     "FROM resident_tax WHERE tax_year = 2025 GROUP BY block"),                             # dominance top lists
    ("SELECT m.idou_type, COUNT(DISTINCT m.person_id) AS n FROM movements m JOIN facilities f "
     "ON m.block = f.block WHERE f.capacity_1 > 12 GROUP BY 1"),                            # population query
    ("SELECT a.block, a.n, b.cap, a.n / b.cap AS ratio FROM (SELECT block, COUNT(*) AS n FROM residents "
     "GROUP BY block) a JOIN (SELECT block, SUM(capacity_1) AS cap FROM facilities GROUP BY block) b "
     "ON a.block = b.block ORDER BY a.block"),                                               # post-processing
]


def test_answers_do_not_depend_on_how_the_store_batches_its_results(inst, monkeypatch):
    """The guard fetches in small Arrow batches (ARROW_BATCH_ROWS), so its cells arrive in
    many chunks: every answer must be the one a single batch gives."""
    import sekisho.guard.execution as execution

    chunks = []
    execute_prepared = execution.Snapshot.execute_prepared

    def counting(self, sql, user, deadline=None):
        table = execute_prepared(self, sql, user, deadline)
        chunks.append(max((c.num_chunks for c in table.columns), default=0))
        return table

    monkeypatch.setattr(execution.Snapshot, "execute_prepared", counting)
    answers = {}
    for rows in (1_000_000, 3):
        monkeypatch.setattr(execution, "ARROW_BATCH_ROWS", rows)
        g = Guard(inst)   # a new guard: its prepared statements and plans are its own
        try:
            results = [g.query(sql, user="ana") for sql in BATCHING_QUERIES]
        finally:
            g.close()
        answers[rows] = [(r.table.schema, sorted(map(repr, r.table.to_pylist())), r.summary["cells"],
                          r.summary["cells_suppressed"], r.summary["values_suppressed_dominance"])
                         for r in results]
        if rows == 3:
            assert max(chunks) > 1   # the small batches did split the cells
        chunks.clear()
    for sql, big, small in zip(BATCHING_QUERIES, answers[1_000_000], answers[3]):
        assert big == small, sql


# ---- describe -------------------------------------------------------------------------------
def test_describe_matches_query_schema(guard):
    sql = ("SELECT block, COUNT(*) AS n, AVG(taxable_income) AS m, COUNT(*) / 2 AS half FROM resident_tax "
           "GROUP BY block")
    schema = guard.describe(sql, user="ana")
    assert schema == guard.query(sql, user="ana").table.schema
    assert schema.field("n").type == pa.int64() and schema.field("m").type == pa.float64()


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_query_and_refusal(inst):
    import os

    if os.geteuid() != 0:
        pytest.skip("--as needs root")
    # the SQL goes in on standard input, never on the command line (readable by all local users)
    base = [sys.executable, "-m", "sekisho.cli", "query", "--home", str(inst.home), "--as", "ana"]
    ok = subprocess.run(base + ["--format", "json", "-"], input="SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex",
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert {row["sex"] for row in json.loads(ok.stdout)} == {"男", "女"}
    bad = subprocess.run(base + ["-"], input="SELECT * FROM residents", capture_output=True, text=True)
    assert bad.returncode == 3 and "row_level_output" in bad.stderr and not bad.stdout
    dp = subprocess.run(base + ["--mode", "dp", "--epsilon", "0.1"], input="SELECT sex, COUNT(*) AS n FROM residents "
                        "GROUP BY sex", capture_output=True, text=True)
    assert dp.returncode == 0 and "ε spent: 0.1" in dp.stdout and "remaining" in dp.stdout
    entry = [e for e in inst.audit.entries(type="query") if e["type"] == "query"][-1]
    assert entry["details"]["operator"] == "root" and entry["user"] == "ana"


def test_refusal_burst_raises_an_alert_that_survives_a_restart(own_city):
    from sekisho.state import set_role

    set_role(own_city, "prober", "analyst")
    burst = load_instance_policy(own_city).disclosure.alerts.refusal_burst
    half = burst // 2
    for i in range(half):
        first = Guard(own_city)
        refused(first, f"SELECT MIN(age) + {i} FROM residents", user="prober")
        first.close()
    g = Guard(own_city)  # a restart: the counters live in state.sqlite
    for i in range(burst - half):
        refused(g, f"SELECT MAX(age) + {i} FROM residents", user="prober")
    g.flush()
    alerts = [e for e in own_city.audit.entries(type="alert", user="prober")]
    assert [a["details"]["alert"] for a in alerts] == ["refusals"]


def test_bulk_volume_alert_from_counters(own_city):
    from sekisho.guard.alerts import record_request
    from sekisho.policy import Alerts

    rules = Alerts(bulk_cells_per_hour=1000, near_duplicate_burst=10_000, near_duplicate_window_s=60,
                   refusal_burst=10_000, refusal_window_s=60)
    found = []
    for i in range(4):
        found += record_request(own_city, rules, user="bulky", fingerprint=f"f{i}", refused=False, cells=300,
                                now=1_000_000.0 + i)
    assert [a["alert"] for a in found] == ["bulk"]       # raised once, when 1,000 cells are crossed
    later = record_request(own_city, rules, user="bulky", fingerprint="f9", refused=False, cells=300,
                           now=1_000_000.0 + 7200)     # an hour later the window is empty again
    assert later == []


def test_views_describe_classes_but_no_hidden_columns(guard):
    views = guard.views("ana")
    assert views["residents"]["columns"]["person_id"]["class"] == "privacy_unit"
    assert views["facilities"]["public"] is True
    assert all("_rkey" not in v["columns"] for v in views.values())
    assert {"title", "purpose", "columns"} <= set(views["residents"])


def test_concurrent_debits_never_overspend(own_city):
    import threading

    from sekisho.guard import budget

    results = []

    def spend():
        try:
            budget.debit(own_city, "racer", "2099-01", 2.0, 10.0, "fp")
            results.append("ok")
        except budget.BudgetExceeded:
            results.append("refused")
    threads = [threading.Thread(target=spend) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("refused") == 7
    assert budget.spent(own_city, "racer", "2099-01") == pytest.approx(10.0)


def test_a_state_file_replaced_at_its_path_is_a_new_ledger(tmp_path):
    """The ledger's connection is kept per thread; a state file replaced at the same
    path (restored, recreated) must be read anew, never through the old file's handle."""
    from sekisho.guard import budget
    from sekisho.instance import Instance

    inst = Instance.create(tmp_path / "home")
    budget.debit(inst, "a", "2099-01", 3.0, 10.0, "fp")
    assert budget.spent(inst, "a", "2099-01") == pytest.approx(3.0)
    old = inst.state_path.with_name("old.sqlite")
    inst.state_path.rename(old)
    for suffix in ("-wal", "-shm"):
        side = inst.state_path.with_name(inst.state_path.name + suffix)
        if side.exists():
            side.rename(old.with_name(old.name + suffix))
    assert budget.spent(inst, "a", "2099-01") == 0.0
    budget.debit(inst, "a", "2099-01", 9.0, 10.0, "fp")
    with pytest.raises(budget.BudgetExceeded):
        budget.debit(inst, "a", "2099-01", 2.0, 10.0, "fp")


def test_global_aggregate_below_k_is_one_null_row():
    """A global aggregate is one cell that always exists: below k it is a NULL row, never
    an empty result (an empty result would differ from a suppressed one)."""
    import numpy as np

    from sekisho.guard.boundary import AggregateSpec
    from sekisho.guard.protect.threshold import protect_threshold

    cells = {"__n": np.array([3]), "__ck": np.array([7]), "__x0": np.array([3])}
    out, stats = protect_threshold(cells, [AggregateSpec(None, "count_rows", None)], [], k=10,
                                   table=PerturbationTable(b"k" * 32, max_noise=2, variance=1.0), min_count=3,
                                   nk_n=2, nk_k=0.9, p_percent=0.1)
    assert len(out["__v0"]) == 1 and np.isnan(out["__v0"][0]) and stats.cells_suppressed == 1


def test_integer_group_key_with_null_is_answered_and_audited(guard, inst):
    """A NULL integer key (CASE without ELSE) reaches the protected table as NULL, not as a
    conversion error; and any unexpected failure is a refusal that is audited."""
    r = guard.query("SELECT CASE WHEN age >= 60 THEN age END AS a, COUNT(*) AS n FROM residents GROUP BY 1",
                    user="ana")
    rows = r.table.to_pylist()
    assert any(row["a"] is None and row["n"] for row in rows)


def test_unexpected_errors_are_refused_audited_and_logged(inst, monkeypatch, caplog):
    """A bug becomes the refusal ``execution_failed`` without its message (which could
    quote a data value), audited; the service's log keeps the traceback and the audit seq."""
    import sekisho.guard.protection as protection
    from sekisho.guard import Guard

    g = Guard(inst)
    monkeypatch.setattr(protection, "to_arrow", lambda *a, **k: (_ for _ in ()).throw(ValueError("value 1234 leaked")))
    before = len(list(inst.audit.entries(type="query.refused")))
    with caplog.at_level("ERROR", logger="sekisho.guard.recording"):
        with pytest.raises(QueryRefused) as info:
            g.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block", user="ana")
    assert info.value.code == "execution_failed" and "1234" not in str(info.value)
    after = list(inst.audit.entries(type="query.refused"))
    assert len(after) == before + 1 and after[-1]["details"]["code"] == "execution_failed"
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and isinstance(logged[-1].exc_info[1], ValueError)
    assert f"audit seq {after[-1]['seq']}" in logged[-1].getMessage()
    g.close()
