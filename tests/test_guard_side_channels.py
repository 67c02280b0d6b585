"""Side channels of the guard (issue 15, class 8).

* Caches that make a repeated query faster are per user: what one analyst asked never
  makes another analyst's query faster (a timing channel), and a plan is filed under the
  snapshot the query actually ran on.
* ε is validated fully before the ledger is touched: anything that is not a finite float
  in [epsilon_per_query_min, epsilon_per_query_max] is ``epsilon_invalid``, with nothing
  debited, and every ε that passes can build the DP mechanisms.
"""

from __future__ import annotations

import math

import pytest

import sekisho.guard.influence as influence
import sekisho.guard.planning as planning
from guard_fixtures import add_snapshot
from sekisho.guard import Guard, QueryRefused

SQL = "SELECT block, COUNT(*) AS n FROM residents WHERE age >= 30 AND sex = '女' GROUP BY block"


# ``inst`` is the shared city (conftest.py); the snapshot switch runs on ``own_city``
@pytest.fixture
def guard(inst):
    """A new guard for every test: the tests below count what its caches hold."""
    g = Guard(inst)
    yield g
    g.close()


def counting(monkeypatch, owner, name):
    """Replace ``owner.name`` by a wrapper that counts its calls."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# ---- caches are per user -----------------------------------------------------------------
def test_a_query_another_user_asked_is_planned_anew(guard, monkeypatch):
    analyses = counting(monkeypatch, planning, "analyze")
    plans = counting(monkeypatch, planning, "make_plan")
    guard.query(SQL, user="ana")
    guard.query(SQL, user="ana")          # the user's own repeat is cached
    assert (len(analyses), len(plans)) == (1, 1)
    guard.query(SQL, user="ana2")         # the same SQL from someone else is not
    assert (len(analyses), len(plans)) == (2, 2)
    guard.describe(SQL, user="ana2")      # describe shares the user's own cache
    assert len(plans) == 2
    assert {key[0] for key in guard.plans.keys()} == {"ana", "ana2"}


def test_no_influence_verdict_from_another_users_query(guard, monkeypatch):
    verdicts = counting(monkeypatch, influence, "decide")
    guard.query(SQL, user="ana")
    guard.query(SQL, user="ana")
    assert len(verdicts) == 1
    guard.query(SQL, user="ana2")
    assert len(verdicts) == 2
    assert {key[0] for key in guard.verdicts.keys()} == {"ana", "ana2"}


def test_no_prepared_statement_from_another_users_query(guard):
    # (a new count takes its cells from the condition-influence scan: the first repeat
    # runs the cells scan, as a prepared statement)
    guard.query(SQL, user="ana")
    guard.query(SQL, user="ana")
    snap = guard.snapshots.snapshot
    prepared = dict(snap._local.prepared)   # this thread's statements (the query ran here)
    assert prepared and {user for user, _ in prepared} == {"ana"}
    guard.query(SQL, user="ana")
    assert dict(snap._local.prepared) == prepared   # the user's repeat reuses them
    guard.query(SQL, user="ana2")
    guard.query(SQL, user="ana2")
    after = dict(snap._local.prepared)
    own = {sql: name for (user, sql), name in after.items() if user == "ana2"}
    theirs = {sql: name for (user, sql), name in prepared.items()}
    assert set(own) == set(theirs)                       # the same statements, prepared again
    assert not set(own.values()) & set(theirs.values())  # under names of their own


def test_a_plan_is_filed_under_the_snapshot_the_query_ran_on(own_city, monkeypatch):
    """The snapshot switches after the query took its snapshot and catalog but before
    it is planned: the plan (made with the old snapshot's catalog) must not be filed
    under the new snapshot, where the next query would pick it up."""
    g = Guard(own_city)
    try:
        g.query(SQL, user="ana")   # opens the current snapshot
        old = g.snapshots.snapshot.id
        plans = counting(monkeypatch, planning, "make_plan")
        catalog = g._catalog
        switched = []

        def catalog_then_switch(role, snap):
            result = catalog(role, snap)
            if not switched:
                switched.append(True)
                add_snapshot(own_city, [])   # a data update lands in between
                g.snapshots.current()
            return result

        monkeypatch.setattr(g, "_catalog", catalog_then_switch)
        g.query("SELECT COUNT(*) AS n FROM residents", user="ana")   # runs on the old snapshot
        assert g.snapshots.snapshot.id != old
        assert [key[2] for key in g.plans.keys()] == [old]
        g.query("SELECT COUNT(*) AS n FROM residents", user="ana")   # the new snapshot: planned anew
        assert len(plans) == 2
    finally:
        g.close()


# ---- ε is validated fully before the ledger ------------------------------------------------
def extreme_epsilons(dp):
    lo, hi = dp.epsilon_per_query_min, dp.epsilon_per_query_max
    return [True, False, None, "0.5", "1", b"1", "nan", complex(0.5, 0), [0.5],
            float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 0, -1.0,
            1e-300, 5e-324, 2.2250738585072014e-308, lo / 2, math.nextafter(lo, 0.0),
            math.nextafter(hi, math.inf), hi * 1.0000001, hi + 1, 10 ** 400, 1e308]


def test_extreme_epsilon_is_refused_before_the_ledger(inst):
    g = Guard(inst)
    try:
        before = g.budget("ana")["spent"]
        for eps in extreme_epsilons(g.policy.disclosure.dp):
            with pytest.raises(QueryRefused) as info:
                g.query("SELECT COUNT(*) AS n FROM residents", user="ana", mode="dp", epsilon=eps)
            assert info.value.code == "epsilon_invalid", repr(eps)
            assert g.budget("ana")["spent"] == before, repr(eps)
    finally:
        g.close()


@pytest.mark.parametrize("bound", ["min", "max"])
def test_dp_query_at_the_epsilon_bounds_succeeds(inst, bound):
    g = Guard(inst)
    try:
        dp = g.policy.disclosure.dp
        eps = dp.epsilon_per_query_min if bound == "min" else dp.epsilon_per_query_max
        before = g.budget("ana2")["spent"]
        # a count (geometric), a mean (snapping + geometric) and a non-public key
        # (Laplace partition selection): every mechanism at the bound
        result = g.query("SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY chome_code",
                         user="ana2", mode="dp", epsilon=eps)
        assert result.summary["epsilon_spent"] == eps
        result = g.query("SELECT sex, AVG(income_levy) AS m, SUM(per_capita_levy) AS s FROM resident_tax "
                         "GROUP BY sex", user="ana2", mode="dp", epsilon=eps)
        assert result.table.num_rows == 2
        assert g.budget("ana2")["spent"] == pytest.approx(before + 2 * eps)
    finally:
        g.close()


def test_dp_mechanisms_construct_for_every_epsilon_that_passes(inst):
    """For the smallest and largest ε the guard accepts, split as a query splits it
    (between boundaries and aggregates), the mechanisms of ``sekisho.guard.protect.dp``
    draw finite noise with every sensitivity and bound it uses for this policy."""
    from sekisho.guard.protection import UNIT_DP_SENSITIVITY
    from sekisho.guard.protect.dp import _fixed_point_sum, _geometric, discrete_laplace, partition_threshold

    import numpy as np

    policy = Guard(inst).policy
    dp = policy.disclosure.dp
    sensitivities = {1, dp.max_rows_per_person, dp.max_groups_per_person, UNIT_DP_SENSITIVITY}
    bounds = {c.bounds for v in policy.views.values() for c in v.columns.values() if c.bounds}
    assert bounds
    for eps in (dp.epsilon_per_query_min, dp.epsilon_per_query_max):
        for split in (1, 7, 64):   # ε / (boundaries x aggregates), partition selection included
            e = eps / split
            for s in sensitivities:
                assert discrete_laplace(3, e, s).dtype == np.int64
                assert math.isfinite(partition_threshold(e, dp.delta, s))
                assert _geometric(np.array([0, 10 ** 6]), e, s).dtype == np.int64
            for lo, hi in bounds:
                for rows in (1, dp.max_rows_per_person):
                    sensitivity = rows * max(abs(lo), abs(hi))
                    noisy = _fixed_point_sum(np.array([float(lo), float(hi) * 1000]), e, sensitivity)
                    assert np.isfinite(noisy).all()


# ---- SQL is not passed on a command line (/proc/<pid>/cmdline) -------------------------------
CLI_SQL = "SELECT sex, COUNT(*) AS n FROM residents WHERE sex IN ('男', '女') GROUP BY sex"


@pytest.fixture
def cli(inst, monkeypatch):
    """``sekisho query --home INST --format json`` as analyst ana, via click's CliRunner."""
    from click.testing import CliRunner

    import sekisho.cli.query as cli_query

    monkeypatch.setattr(cli_query, "resolve_caller", lambda as_user: ("ana", None))

    def invoke(*args, **kwargs):
        return CliRunner().invoke(cli_query.query, ["--home", str(inst.home), "--format", "json", *args], **kwargs)

    return invoke


def answered(result) -> set[str]:
    import json

    assert result.exit_code == 0, result.output
    return {row["sex"] for row in json.loads(result.stdout)}


def test_cli_reads_sql_from_standard_input(cli, inst):
    result = cli("-", input=CLI_SQL + "\n")
    assert answered(result) == {"男", "女"}
    assert "warning" not in result.stderr
    entry = [e for e in inst.audit.entries(type="query") if e["type"] == "query"][-1]
    assert entry["details"]["sql"].strip() == CLI_SQL and entry["user"] == "ana"


def test_cli_reads_standard_input_without_an_argument_when_it_is_not_a_terminal(cli):
    result = cli(input=CLI_SQL)   # CliRunner's standard input is not a TTY
    assert answered(result) == {"男", "女"}
    assert "warning" not in result.stderr


def test_cli_reads_sql_from_a_file(cli, tmp_path):
    path = tmp_path / "q.sql"
    path.write_text(f"-- 男女別の人数\n{CLI_SQL}\n", encoding="utf-8")
    result = cli("--file", str(path))
    assert answered(result) == {"男", "女"}
    assert "warning" not in result.stderr


def test_cli_missing_sql_file_is_named(cli, tmp_path):
    path = tmp_path / "nope.sql"
    result = cli("--file", str(path))
    assert result.exit_code != 0 and not result.stdout
    assert str(path) in result.stderr and "cannot read the SQL file" in result.stderr


@pytest.mark.parametrize("args, input_, words", [
    (["--file", "q.sql", CLI_SQL], None, "not both"),
    (["-"], "  \n", "is empty"),
])
def test_cli_sql_usage_errors(cli, tmp_path, monkeypatch, args, input_, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.sql").write_text(CLI_SQL, encoding="utf-8")
    result = cli(*args, input=input_)
    assert result.exit_code == 2 and words in result.stderr


def test_cli_sql_argument_still_works_but_warns(cli):
    from sekisho.cli.query import CMDLINE_WARNING

    result = cli(CLI_SQL)
    assert answered(result) == {"男", "女"}
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning == [CMDLINE_WARNING]
    assert "警告" in CMDLINE_WARNING and "visible to other local users" in CMDLINE_WARNING
