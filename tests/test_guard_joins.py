"""Joins on the person and household keys (issue 18 item 1), answered on the real pipeline
(synth -> ingest -> store) through SQL and ibis, compared with the truth from the raw store:
counts within the policy's cell-key noise D (threshold) or a bound computed from the DP
mechanism's parameters, exactly the cells below k suppressed — k counted in persons, or in
households when household facts are joined."""

from __future__ import annotations

import math

import ibis
import pytest

from guard_fixtures import ibis_table, truth
from sekisho.guard import QueryRefused
from sekisho.policy import load_instance_policy


@pytest.fixture(scope="module")
def city(real_city):
    return real_city


@pytest.fixture(scope="module")
def inst(real_city):
    return real_city.instance   # ``guard`` (conftest.py) is a guard over it


@pytest.fixture(scope="module")
def disclosure(city):
    return load_instance_policy(city.instance).disclosure


def tables(guard, user):
    return {v: ibis_table(guard, user, v) for v in ("residents", "childcare", "resident_tax")}


def check_against_truth(result, true_sql, inst, disclosure, value="n", joins_left_out=0):
    """Every released cell within D of the truth, suppressed when its contributors (the
    truth's last column) are fewer than k; a cell answered without conditions that change
    it by fewer than k (``widened``, cell_widening) holds the truth within its interval.
    ``joins_left_out``: INNER joins that change nobody (every row matches), which the
    condition-influence rule leaves out (answered as LEFT joins: the same rows)."""
    from sekisho.guard.protect import status
    from sekisho.protocol import cells_by_column

    k, d = disclosure.k, disclosure.perturbation.max_noise
    left_out = result.summary["conditions_left_out"]
    assert len(left_out) == joins_left_out and all(c.startswith("JOIN ") for c in left_out), left_out
    true = {tuple(r[:-2]): (r[-2], r[-1]) for r in truth(inst, true_sql)}
    keys = [c for c in result.table.column_names if c != value]
    companion = cells_by_column(result.cells)[value]
    states, lows, highs = (companion[c].to_pylist() for c in ("status", "low", "high"))
    seen = set()
    widened = 0
    for row, state, low, high in zip(result.table.to_pylist(), states, lows, highs):
        key = tuple(row[c] for c in keys)
        seen.add(key)
        rows, contributors = true.get(key, (0, 0))
        if row[value] is None:
            assert state == status.SUPPRESSED_K, (key, rows, contributors)
        elif state == status.WIDENED:
            assert low <= rows <= high, (key, rows, row[value], low, high)
            widened += 1
        else:
            assert state == status.RELEASED and contributors >= k and abs(row[value] - rows) <= d, \
                (key, rows, contributors, row[value], d)
    assert not widened or result.summary["cell_influence_checked"], (widened, result.summary)
    assert all(key in seen for key, (_, c) in true.items() if c >= k)
    return true


def canonical(result):
    return sorted(result.table.to_pylist(), key=lambda r: tuple(str(v) for v in r.values()))


# ---- threshold mode ---------------------------------------------------------------------------
INNER = ("SELECT r.block, c.cert_type, COUNT(*) AS n FROM residents r JOIN childcare c "
         "ON r.person_id = c.person_id GROUP BY 1, 2")


def test_inner_join_on_the_person_key(guard, city, disclosure):
    result = guard.query(INNER, user=city.analyst)
    true = check_against_truth(result, "SELECT r.block, c.cert_type, COUNT(*), COUNT(DISTINCT r.person_id) "
                               "FROM residents r JOIN childcare c ON r.person_id = c.person_id GROUP BY 1, 2",
                               city.instance, disclosure)
    assert any(c >= disclosure.k for _, c in true.values()) and any(0 < c < disclosure.k for _, c in true.values())
    # the same join from ibis gets the same answer (same contributors, same cell keys)
    t = tables(guard, city.analyst)
    j = t["residents"].join(t["childcare"], "person_id")
    expr = j.group_by([j.block, j.cert_type]).agg(n=j.count())
    via_ibis = guard.query(ibis.to_sql(expr, dialect="duckdb"), user=city.analyst)
    assert canonical(via_ibis) == canonical(result)
    # and with the views the other way round: the record key is the person's (residents)
    swapped = guard.query("SELECT r.block, c.cert_type, COUNT(*) AS n FROM childcare c JOIN residents r "
                          "ON c.person_id = r.person_id GROUP BY 1, 2", user=city.analyst)
    assert canonical(swapped) == canonical(result)


def test_left_join_keeps_the_unmatched(guard, city, disclosure):
    sql = ("SELECT c.cert_type, COUNT(*) AS n FROM residents r LEFT JOIN childcare c "
           "ON r.person_id = c.person_id WHERE r.age < 6 GROUP BY 1")
    result = guard.query(sql, user=city.analyst)
    true = check_against_truth(result, "SELECT c.cert_type, COUNT(*), COUNT(DISTINCT r.person_id) FROM residents r "
                               "LEFT JOIN childcare c ON r.person_id = c.person_id WHERE r.age < 6 GROUP BY 1",
                               city.instance, disclosure)
    assert (None,) in true   # children without certification: the unmatched rows are counted
    t = tables(guard, city.analyst)
    r = t["residents"].filter(t["residents"].age < 6)
    j = r.left_join(t["childcare"], "person_id")
    via_ibis = guard.query(ibis.to_sql(j.group_by(j.cert_type).agg(n=j.count()), dialect="duckdb"),
                           user=city.analyst)
    assert canonical(via_ibis) == canonical(result)


SEMI_TRUTH = ("SELECT block, COUNT(*), COUNT(DISTINCT person_id) FROM residents r WHERE r.person_id IN "
              "(SELECT person_id FROM childcare WHERE cert_type = '2号') GROUP BY 1")


@pytest.mark.parametrize("sql", [
    "SELECT block, COUNT(*) AS n FROM residents WHERE person_id IN "
    "(SELECT person_id FROM childcare WHERE cert_type = '2号') GROUP BY 1",
    "SELECT r.block, COUNT(*) AS n FROM residents r WHERE EXISTS "
    "(SELECT 1 FROM childcare c WHERE c.person_id = r.person_id AND c.cert_type = '2号') GROUP BY 1",
    "SELECT r.block, COUNT(*) AS n FROM residents r SEMI JOIN childcare c "
    "ON r.person_id = c.person_id AND c.cert_type = '2号' GROUP BY 1",
    "ibis:isin", "ibis:semi_join",
])
def test_semi_joins_agree_with_each_other_and_the_truth(guard, city, disclosure, sql):
    if sql.startswith("ibis:"):
        t = tables(guard, city.analyst)
        r, c = t["residents"], t["childcare"]
        two = c.filter(c.cert_type == "2号")
        s = r.filter(r.person_id.isin(two.person_id)) if sql == "ibis:isin" else r.semi_join(two, "person_id")
        sql = ibis.to_sql(s.group_by("block").agg(n=s.count()), dialect="duckdb")
    result = guard.query(sql, user=city.analyst)
    check_against_truth(result, SEMI_TRUTH, city.instance, disclosure)
    reference = guard.query("SELECT block, COUNT(*) AS n FROM residents WHERE person_id IN "
                            "(SELECT person_id FROM childcare WHERE cert_type = '2号') GROUP BY 1", user=city.analyst)
    assert canonical(result) == canonical(reference)


def test_anti_join(guard, city, disclosure):
    sql = ("SELECT r.sex, COUNT(*) AS n FROM residents r WHERE r.age < 6 AND NOT EXISTS "
           "(SELECT 1 FROM childcare c WHERE c.person_id = r.person_id) GROUP BY 1")
    result = guard.query(sql, user=city.analyst)
    check_against_truth(result, "SELECT sex, COUNT(*), COUNT(DISTINCT person_id) FROM residents r WHERE age < 6 "
                        "AND person_id NOT IN (SELECT person_id FROM childcare) GROUP BY 1", city.instance, disclosure)
    t = tables(guard, city.analyst)
    r = t["residents"].filter(t["residents"].age < 6)
    a = r.anti_join(t["childcare"], "person_id")
    via_ibis = guard.query(ibis.to_sql(a.group_by("sex").agg(n=a.count()), dialect="duckdb"), user=city.analyst)
    assert canonical(via_ibis) == canonical(result)


def test_persons_joined_to_their_household_count_households_for_k(guard, city, disclosure):
    sql = ("SELECT h.members, COUNT(*) AS n FROM residents r JOIN (SELECT household_id, COUNT(*) AS members "
           "FROM residents GROUP BY household_id) h ON r.household_id = h.household_id "
           "WHERE r.age < 15 GROUP BY 1")
    result = guard.query(sql, user=city.analyst)
    true = check_against_truth(
        result, "SELECT h.members, COUNT(*), COUNT(DISTINCT r.household_id) FROM residents r JOIN "
        "(SELECT household_id, COUNT(*) AS members FROM residents GROUP BY household_id) h "
        "ON r.household_id = h.household_id WHERE r.age < 15 GROUP BY 1", city.instance, disclosure,
        joins_left_out=1)
    # some cell has >= k persons but fewer than k households: suppressed (k counts households)
    persons = {key: rows for key, (rows, _) in true.items()}
    assert any(persons[key] >= disclosure.k > households for key, (_, households) in true.items()), true
    assert any("世帯" in note for note in result.summary["notes_ja"])
    # the same through ibis
    t = tables(guard, city.analyst)
    r = t["residents"]
    h = r.group_by("household_id").agg(members=r.count())
    kids = r.filter(r.age < 15)
    j = kids.join(h, "household_id")
    via_ibis = guard.query(ibis.to_sql(j.group_by("members").agg(n=j.count()), dialect="duckdb"), user=city.analyst)
    assert canonical(via_ibis) == canonical(result)


def test_household_semi_join(guard, city, disclosure):
    sql = ("SELECT block, COUNT(*) AS n FROM residents WHERE household_id IN "
           "(SELECT household_id FROM residents WHERE age < 6) GROUP BY 1")
    result = guard.query(sql, user=city.analyst)
    check_against_truth(result, "SELECT block, COUNT(*), COUNT(DISTINCT household_id) FROM residents "
                        "WHERE household_id IN (SELECT household_id FROM residents WHERE age < 6) GROUP BY 1",
                        city.instance, disclosure)
    t = tables(guard, city.analyst)
    r = t["residents"]
    s = r.filter(r.household_id.isin(r.filter(r.age < 6).household_id))
    via_ibis = guard.query(ibis.to_sql(s.group_by("block").agg(n=s.count()), dialect="duckdb"), user=city.analyst)
    assert canonical(via_ibis) == canonical(result)


def test_a_measure_through_a_one_row_join(guard, city, disclosure):
    """Taxpayers of one year joined to their resident record: the tax view fixed to one
    year is one row per person, so each person counts once."""
    sql = ("SELECT t.block, COUNT(*) AS n FROM resident_tax t JOIN residents r ON t.person_id = r.person_id "
           "WHERE t.tax_year = 2025 AND r.age >= 40 GROUP BY 1")
    result = guard.query(sql, user=city.analyst)
    check_against_truth(result, "SELECT t.block, COUNT(*), COUNT(DISTINCT t.person_id) FROM resident_tax t "
                        "JOIN residents r ON t.person_id = r.person_id WHERE t.tax_year = 2025 AND r.age >= 40 "
                        "GROUP BY 1", city.instance, disclosure, joins_left_out=1)


# ---- DP mode ----------------------------------------------------------------------------------
def dp_scale(result, epsilon: float, sensitivity: int, shares: int = 2) -> float:
    """An upper bound on the discrete Laplace scale of one released count: the count's
    sensitivity over its share of ε (at most ``shares`` noisy quantities here)."""
    return sensitivity * shares / epsilon


@pytest.mark.parametrize("sql, truth_sql", [
    ("SELECT block, COUNT(*) AS n FROM residents WHERE person_id IN (SELECT person_id FROM childcare) GROUP BY 1",
     "SELECT block, COUNT(*) FROM residents WHERE person_id IN (SELECT person_id FROM childcare) GROUP BY 1"),
    ("SELECT r.block, COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
     "WHERE t.tax_year = 2025 GROUP BY 1",
     "SELECT r.block, COUNT(*) FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
     "WHERE t.tax_year = 2025 GROUP BY 1"),
])
def test_dp_bounds_of_a_join_from_its_parts(guard, city, sql, truth_sql):
    """Both parts one row per person by declaration: the join is one row per person
    (sensitivity 1), not the policy-wide 60 rows x 12 groups."""
    epsilon = 1.0
    result = guard.query(sql, user=city.analyst, mode="dp", epsilon=epsilon)
    true = dict(truth(city.instance, truth_sql))
    b = dp_scale(result, epsilon, sensitivity=1)
    errors = [row["n"] - true.get(row["block"], 0) for row in result.table.to_pylist()]
    assert len(errors) == 13   # the block domain is public: every block released
    assert all(abs(e) <= 30 * b for e in errors), errors
    # the discrete Laplace standard deviation is about sqrt(2)·b; policy bounds would give ~60x
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert rmse <= 4 * math.sqrt(2) * b, (rmse, errors)


def test_dp_household_linkage_refused_before_any_debit(guard, city):
    sql_ok = "SELECT block, COUNT(*) AS n FROM residents GROUP BY 1"
    before = guard.query(sql_ok, user=city.analyst, mode="dp", epsilon=0.01).summary["epsilon_remaining"]
    with pytest.raises(QueryRefused) as info:
        guard.query("SELECT block, COUNT(*) AS n FROM residents WHERE household_id IN "
                    "(SELECT household_id FROM residents WHERE age < 6) GROUP BY 1",
                    user=city.analyst, mode="dp", epsilon=0.5)
    assert info.value.code == "dp_household_linkage"
    after = guard.query(sql_ok, user=city.analyst, mode="dp", epsilon=0.01).summary["epsilon_remaining"]
    assert after == pytest.approx(before - 0.01)
