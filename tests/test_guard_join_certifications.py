"""Issue 18's first example: ``childcare`` (several certifications per child) joined to
``resident_tax`` on the person, a measure of ``resident_tax`` averaged per 認定区分.

The policy declares ``childcare.unique_per_person: [cert_ym, cert_type]`` (one
certification per child, 認定年月 and 認定区分; checked on every upload, see
tests/test_ingest.py): fixing 認定年月 to one literal and fixing or grouping by 認定区分
leaves one childcare row per child in each cell, so the tax measure is not repeated and the
join is answered. Without 認定年月 fixed it stays ``join_fan_out``, and the reason names
what to fix.

The city is GUARD's planted one (``own_city``) with its ``childcare`` replaced by
certifications that break one-row-per-person in both ways the declaration allows: a third
of the children also hold a certification in an earlier month, and a share of the 3号
children also a 2号 certification in the same month (the 3号 → 2号 change at the third
birthday). Every child has tax records in this city, so the sums are not empty.

Tolerances come from the mechanisms' parameters: counts within the cell-key bound D; sums
within the sum noise fraction × the cell's largest contribution (computed here from the
raw store); means within the ratio of those intervals; DP values within the discrete
Laplace quantile of ε and the declared contribution bound at failure probability
``FAILURE`` per value.
"""

from __future__ import annotations

import re

import ibis
import pytest

from attack_oracle import RawOracle
from dp_bounds_helper import FAILURE, dp_bound, dp_mean_range, dp_sum_bound
from guard_fixtures import ibis_table, new_snapshot, truth
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.protect import status
from sekisho.guard.protect.cellkey import SUM_NOISE_FRACTION
from sekisho.policy import load_instance_policy
from sekisho.protocol import cells_by_column

MONTH, EARLIER = "2025-04", "2025-03"
EPSILON = 0.5


@pytest.fixture(scope="module")
def inst(own_city):
    """own_city with certifications: every child one in MONTH (its type) except every
    fifth, a third of them one in EARLIER too, and every second 3号 child a 2号 in MONTH."""
    text = own_city.policy_path.read_text(encoding="utf-8")
    own_city.policy_path.write_text(re.sub(r"(?m)^(\s+budget_per_period:).*$", r"\1 100000.0", text),
                                    encoding="utf-8")
    new_snapshot(own_city, lambda con: con.execute("""
            CREATE TABLE childcare AS
            WITH kids AS (SELECT *, row_number() OVER (ORDER BY person_id) AS i FROM old.childcare)
            SELECT * EXCLUDE (i) REPLACE (CASE WHEN i % 5 = 0 THEN '2025-01' ELSE '2025-04' END AS cert_ym)
            FROM kids
            UNION ALL
            SELECT * EXCLUDE (i) REPLACE ('2025-03' AS cert_ym, (_rkey + 101) % 256 AS _rkey)
            FROM kids WHERE i % 3 = 0
            UNION ALL
            SELECT * EXCLUDE (i) REPLACE ('2号' AS cert_type, '2025-04' AS cert_ym, (_rkey + 57) % 256 AS _rkey)
            FROM kids WHERE cert_type = '3号' AND i % 2 = 0 AND i % 5 <> 0"""), rebuilt=("childcare",))
    return own_city


@pytest.fixture(scope="module")
def policy(inst):
    return load_instance_policy(inst)


@pytest.fixture(scope="module")
def analyst():
    return "ana"


def test_the_data_breaks_one_row_per_person_both_ways_the_declaration_allows(inst, policy):
    assert policy.views["childcare"].unique_per_person == ("cert_ym", "cert_type")
    (dup_type,) = truth(inst, "SELECT count(*) FROM (SELECT person_id FROM childcare WHERE cert_ym = '2025-04' "
                              "GROUP BY person_id HAVING count(*) > 1)")[0]
    (dup_month,) = truth(inst, "SELECT count(*) FROM (SELECT person_id FROM childcare GROUP BY person_id, "
                               "cert_type HAVING count(*) > 1)")[0]
    (declared,) = truth(inst, "SELECT count(*) FROM (SELECT 1 FROM childcare GROUP BY person_id, cert_ym, "
                              "cert_type HAVING count(*) > 1)")[0]
    assert dup_type >= 10 and dup_month >= 10 and declared == 0


# ---- threshold mode: the issue's example, compared with the truth -------------------------------

JOINED = ("FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id "
          f"WHERE t.tax_year = 2025 AND c.cert_ym = '{MONTH}'")
# per cell and person: the person's tax row once (one childcare row per child and type)
TRUE_CELLS = f"""
    SELECT c.cert_type, count(*) AS rows, count(DISTINCT c.person_id) AS persons,
           sum(t.income_levy) AS total, max(t.income_levy) AS top1
    {JOINED} GROUP BY c.cert_type"""


def cell_truth(inst) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in truth(inst, TRUE_CELLS)}


def statuses_of(result, column):
    return cells_by_column(result.cells)[column]["status"].to_pylist()


def test_the_issue_example_is_answered_and_matches_the_truth(guard, inst, policy, analyst):
    sql = (f"SELECT c.cert_type, AVG(t.income_levy) AS mean, SUM(t.income_levy) AS total, COUNT(*) AS n "
           f"{JOINED} GROUP BY 1")
    result = guard.query(sql, user=analyst)
    # every child has a tax record here: the JOIN changes nobody and is answered as a LEFT
    # join (the same rows); the fixing conditions are never left out
    assert all(c.startswith("JOIN ") for c in result.summary["conditions_left_out"])
    k, d = policy.disclosure.k, policy.disclosure.perturbation.max_noise
    true = cell_truth(inst)
    rows = result.table.to_pylist()
    assert {r["cert_type"] for r in rows} == {"1号", "2号", "3号"}
    compared = 0
    for i, row in enumerate(rows):
        n_rows, persons, total, top1 = true.get(row["cert_type"], (0, 0, 0, 0))
        assert n_rows == persons           # one childcare row per child in the cell: no fan-out
        for column in ("mean", "total", "n"):
            state = statuses_of(result, column)[i]
            if persons < k:
                assert row[column] is None and state == status.SUPPRESSED_K, (row, persons)
            else:
                assert state != status.SUPPRESSED_K, (row, persons)
        if persons < k:
            continue
        assert abs(row["n"] - n_rows) <= d
        if statuses_of(result, "total")[i] == status.SUPPRESSED_DOMINANCE:
            continue
        noise = SUM_NOISE_FRACTION * top1        # |multiplier| <= 1
        assert abs(row["total"] - total) <= noise + 1e-6, (row, total, noise)
        low, high = (total - noise) / (n_rows + d), (total + noise) / max(n_rows - d, 1)
        assert low - 1e-6 <= row["mean"] <= high + 1e-6, (row, low, high)
        compared += 1
    assert compared >= 2


def test_a_child_with_two_types_in_the_month_counts_once_in_each_cell(guard, inst, policy, analyst):
    """Grouped by 認定区分, a child holding 3号 and 2号 in the month is in both cells, once each."""
    d = policy.disclosure.perturbation.max_noise
    result = guard.query(f"SELECT c.cert_type, COUNT(DISTINCT c.person_id) AS n {JOINED} GROUP BY c.cert_type",
                         user=analyst)
    true = cell_truth(inst)
    for row in result.table.to_pylist():
        if row["n"] is not None:
            assert abs(row["n"] - true[row["cert_type"]][1]) <= d


def test_without_the_month_it_stays_join_fan_out_and_says_to_fix_the_month(guard, analyst):
    sql = ("SELECT c.cert_type, AVG(t.income_levy) FROM childcare c JOIN resident_tax t "
           "ON c.person_id = t.person_id WHERE t.tax_year = 2025 GROUP BY 1")
    with pytest.raises(QueryRefused) as refused:
        guard.query(sql, user=analyst)
    assert refused.value.code == "join_fan_out"
    assert "認定年月" in refused.value.reason and "cert_ym" in refused.value.reason
    assert "認定区分" in refused.value.reason


def test_the_suggestion_names_the_column_to_fix(guard, analyst):
    from sekisho.client.suggest import suggest

    class Refusal:
        code, part = "join_fan_out", "resident_tax.income_levy × childcare"
        sql = ("SELECT c.cert_type, AVG(t.income_levy) FROM childcare c JOIN resident_tax t "
               "ON c.person_id = t.person_id WHERE t.tax_year = 2025 GROUP BY 1")

    hint = suggest(Refusal(), guard.views(analyst))
    assert hint is not None and "認定年月" in hint.text and "cert_ym" in hint.text


# ---- DP mode: bounds from the declaration -------------------------------------------------------

def test_dp_with_both_columns_fixed_uses_one_row_per_person(guard, inst, analyst):
    """cert_ym and cert_type fixed: one row and one group per person (Δ = 1); the count is
    the contributor count, one noisy quantity: the whole ε."""
    sql = f"SELECT COUNT(*) AS n {JOINED} AND c.cert_type = '3号'"
    bound = dp_bound(EPSILON, 1)
    ((persons,),) = truth(inst, f"SELECT count(DISTINCT c.person_id) {JOINED} AND c.cert_type = '3号'")
    for _ in range(3):
        (row,) = guard.query(sql, user=analyst, mode="dp", epsilon=EPSILON).table.to_pylist()
        assert abs(row["n"] - persons) <= bound, (row, persons, bound)
    assert bound < 40     # the policy-wide bound (60 rows per person) would allow thousands


def test_dp_grouped_by_type_falls_back_to_the_policy_bounds(guard, inst, policy, analyst):
    """Grouped by 認定区分, a child may hold two rows (two cells): the policy's bounds."""
    rows_per_person = policy.disclosure.dp.max_rows_per_person
    bound = dp_bound(EPSILON, rows_per_person)      # COUNT(*) of rows, public keys: one share
    true = cell_truth(inst)
    result = guard.query(f"SELECT c.cert_type, COUNT(*) AS n {JOINED} GROUP BY 1", user=analyst, mode="dp",
                         epsilon=EPSILON)
    for row in result.table.to_pylist():
        assert abs(row["n"] - true.get(row["cert_type"], (0,))[0]) <= bound


# ---- attacks: fan-out amplification stays refused ----------------------------------------------

def amplifies(raw, sql, one_row_sql) -> bool:
    """Against the raw store the attack's sum differs from the one-row-per-person sum."""
    a = raw.query(sql).table.to_pylist()
    b = raw.query(one_row_sql).table.to_pylist()
    return a != b


ONE_ROW = ("SELECT SUM(t.income_levy) AS s FROM resident_tax t WHERE t.tax_year = 2025 AND t.person_id IN "
           "(SELECT person_id FROM childcare)")


# the same attack with the join in a subquery and its filter one level up (ibis's filter after
# a join): the subquery is ``c`` there, so the conditions read the same
SAME_SCOPE = ("SELECT SUM(t.income_levy) AS s FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id "
              "WHERE t.tax_year = 2025 {where}")
AFTER_THE_JOIN = ("SELECT SUM(c.income_levy) AS s FROM (SELECT x.cert_ym, x.cert_type, t.tax_year, t.income_levy "
                  "FROM childcare x JOIN resident_tax t ON x.person_id = t.person_id) c "
                  "WHERE c.tax_year = 2025 {where}")


@pytest.mark.parametrize("form", [SAME_SCOPE, AFTER_THE_JOIN], ids=["same-scope", "after-the-join"])
@pytest.mark.parametrize("where", [
    "",                                                       # no month: every certification
    f"AND c.cert_ym IN ('{EARLIER}', '{MONTH}')",             # two months: a child certified in both
    f"AND (c.cert_ym = '{MONTH}' OR c.cert_ym = '{EARLIER}')",
    f"AND c.cert_ym >= '{EARLIER}'",
    f"AND NOT (c.cert_ym <> '{MONTH}')",                      # the month, but not as C = literal
    f"AND c.cert_ym = '{MONTH}'",                             # the month alone: 3号 and 2号 in one cell
], ids=["no-month", "two-months", "or", "range", "not", "month-not-type"])
def test_fan_out_amplification_is_refused(guard, inst, analyst, where, form):
    raw = RawOracle(inst)
    sql = form.format(where=where)
    one_row = ONE_ROW if not where or "IN" in where or "OR" in where or ">=" in where or "NOT" in where else (
        ONE_ROW.replace("FROM childcare)", f"FROM childcare WHERE cert_ym = '{MONTH}')"))
    assert amplifies(raw, sql, one_row), "not a real attack: nobody's rows are repeated"
    with pytest.raises(QueryRefused) as refused:
        guard.query(sql, user=analyst)
    assert refused.value.code == "join_fan_out"


@pytest.mark.parametrize("group", [
    "CASE WHEN c.cert_type = '3号' THEN 'a' ELSE 'b' END",    # an expression of the type merges cells
    "c.sex",
])
def test_grouping_by_anything_but_the_declared_column_is_refused(guard, analyst, group):
    sql = (f"SELECT {group} AS g, SUM(t.income_levy) AS s FROM childcare c JOIN resident_tax t "
           f"ON c.person_id = t.person_id WHERE t.tax_year = 2025 AND c.cert_ym = '{MONTH}' GROUP BY 1")
    with pytest.raises(QueryRefused) as refused:
        guard.query(sql, user=analyst)
    assert refused.value.code == "join_fan_out"


def test_a_second_view_with_several_rows_is_still_refused(guard, analyst):
    sql = ("SELECT c.cert_type, COUNT(*) AS n FROM childcare c JOIN movements m ON c.person_id = m.person_id "
           "JOIN resident_tax t ON t.person_id = c.person_id "
           f"WHERE c.cert_ym = '{MONTH}' GROUP BY 1")
    with pytest.raises(QueryRefused) as refused:
        guard.query(sql, user=analyst)
    assert refused.value.code == "join_fan_out"


def test_a_fixing_condition_that_changes_few_is_refused_not_left_out(inst, policy):
    """Condition influence leaves out a condition that changes fewer than k contributors;
    left out, 認定年月 = M would let the rows fan out after the join was accepted, so the
    query is refused instead, naming it. A policy with a larger k (100: the 1号 children certified in the month number
    ~117, of whom far fewer than 100 change without the month) shows it."""
    _refused_for_the_month_under_k_100(inst, policy, f"SELECT COUNT(*) AS n {JOINED} AND c.cert_type = '1号'")


def _refused_for_the_month_under_k_100(inst, policy, sql: str) -> None:
    import dataclasses

    wide = dataclasses.replace(policy, disclosure=dataclasses.replace(policy.disclosure, k=100))
    guard = Guard(inst, policy=wide)
    try:
        with pytest.raises(QueryRefused) as refused:
            guard.query(sql, user="ana")
        assert refused.value.code == "condition_influence_below_k"
        assert "cert_ym" in refused.value.part
    finally:
        guard.close()


def test_dp_sum_and_mean_of_the_issue_example_are_within_the_mechanism_bounds(guard, inst, policy, analyst):
    """Both columns fixed (one row per child, Δ = 1 row). ε is split evenly between the
    noisy quantities: SUM and COUNT (the contributor count) two shares; AVG (a noisy sum
    over a noisy count) two shares. The sum's sensitivity is the measure's declared bound;
    the mean lies between the corners of (sum ± its bound)/(count ± its bound), clipped.
    Failure probability FAILURE per query (union over its two noisy quantities)."""
    low, high = policy.views["resident_tax"].columns["income_levy"].bounds
    where = f"{JOINED} AND c.cert_type = '3号'"
    ((rows, total, top),) = truth(inst, f"SELECT count(*), sum(t.income_levy), max(t.income_levy) {where}")
    assert rows >= 50 and top <= high          # the clamp changes nothing: the raw sum is the clamped one
    share = EPSILON / 2
    count_bound, sum_bound = dp_bound(share, 1, FAILURE / 2), dp_sum_bound(share, high, FAILURE / 2)
    for _ in range(3):
        (row,) = guard.query(f"SELECT SUM(t.income_levy) AS total, COUNT(*) AS n {where}", user=analyst,
                             mode="dp", epsilon=EPSILON).table.to_pylist()
        assert abs(row["n"] - rows) <= count_bound, (row, rows, count_bound)
        assert abs(row["total"] - total) <= sum_bound, (row, total, sum_bound)
    # the mean at the largest ε a query may spend: its range then excludes most of [low, high]
    epsilon = policy.disclosure.dp.epsilon_per_query_max
    mean_low, mean_high = dp_mean_range(total, rows, dp_sum_bound(epsilon / 2, high, FAILURE / 2),
                                        dp_bound(epsilon / 2, 1, FAILURE / 2), low, high)
    assert mean_high < high / 2, (rows, total, mean_high)
    for _ in range(3):
        (row,) = guard.query(f"SELECT AVG(t.income_levy) AS mean {where}", user=analyst, mode="dp",
                             epsilon=epsilon).table.to_pylist()
        assert row["mean"] is None or mean_low <= row["mean"] <= mean_high, (row, mean_low, mean_high)


# ---- the fixing conditions inside subqueries, as ibis writes a filter before a join -------------

NESTED = ("FROM (SELECT * FROM childcare WHERE cert_ym = '{month}') c "
          "JOIN (SELECT * FROM resident_tax WHERE tax_year = 2025) t ON c.person_id = t.person_id")


def test_the_month_fixed_in_a_subquery_gives_the_same_answer_as_in_the_where(guard, analyst):
    """``cc.filter(cc.cert_ym == M).join(tax.filter(...), ...)`` compiles to subqueries
    that fix the identity's columns below the join: the same rows per child and cell as
    the WHERE of the flat query, so the same protected answer."""
    outputs = "SELECT c.cert_type, AVG(t.income_levy) AS mean, SUM(t.income_levy) AS total, COUNT(*) AS n"
    flat = guard.query(f"{outputs} {JOINED} GROUP BY 1 ORDER BY 1", user=analyst)
    nested = guard.query(f"{outputs} {NESTED.format(month=MONTH)} GROUP BY 1 ORDER BY 1", user=analyst)
    assert nested.table.to_pylist() == flat.table.to_pylist()
    for column in ("mean", "total", "n"):
        assert statuses_of(nested, column) == statuses_of(flat, column)
    # and one level further up (a filter on the joined rows before the aggregation)
    again = guard.query(f"SELECT j.cert_type, AVG(j.income_levy) AS mean FROM (SELECT c.cert_type, t.income_levy "
                        f"{NESTED.format(month=MONTH)}) j GROUP BY 1 ORDER BY 1", user=analyst)
    assert again.table.column("mean").to_pylist() == flat.table.column("mean").to_pylist()


@pytest.mark.parametrize("inner, group", [
    (f"SELECT * FROM childcare WHERE cert_ym >= '{EARLIER}'", "c.cert_type"),      # a range fixes nothing
    (f"SELECT * FROM childcare WHERE cert_ym = '{MONTH}'", None),                   # 3号 and 2号 in one cell
    (f"SELECT * FROM childcare WHERE cert_ym = '{MONTH}'", "c.sex"),
    # the type passed on as an expression merges cells: not the declared column
    (f"SELECT person_id, CASE WHEN cert_type = '3号' THEN '3号' ELSE 'x' END AS cert_type FROM childcare "
     f"WHERE cert_ym = '{MONTH}'", "c.cert_type"),
], ids=["range", "month-not-type", "other-group", "type-as-expression"])
def test_a_subquery_that_leaves_several_rows_per_cell_is_still_join_fan_out(guard, analyst, inner, group):
    select = f"SELECT {group} AS g, SUM(t.income_levy) AS s" if group else "SELECT SUM(t.income_levy) AS s"
    sql = (f"{select} FROM ({inner}) c JOIN resident_tax t ON c.person_id = t.person_id "
           f"WHERE t.tax_year = 2025" + (" GROUP BY 1" if group else ""))
    with pytest.raises(QueryRefused) as refused:
        guard.query(sql, user=analyst)
    assert refused.value.code == "join_fan_out"


def test_a_fixing_condition_inside_a_subquery_is_refused_not_left_out(inst, policy):
    """As ``test_a_fixing_condition_that_changes_few_is_refused_not_left_out``, the month
    fixed below the join: it is a row identity there too."""
    _refused_for_the_month_under_k_100(
        inst, policy, f"SELECT COUNT(*) AS n {NESTED.format(month=MONTH)} WHERE c.cert_type = '1号'")


def test_a_partly_fixed_identity_bounds_dp_noise_by_the_grouped_domain(inst, policy):
    # cert_ym fixed and cert_type grouped: a child has at most one row per 区分, in at most
    # three (the domain): the noise is that of 3 rows, not the policy's 60; a range on
    # cert_ym fixes nothing, so the same counts there carry the policy's bounds
    g = Guard(inst)
    try:
        def widths(where: str) -> list[float]:
            r = g.query(f"SELECT cert_type, COUNT(*) AS n FROM childcare WHERE {where} GROUP BY cert_type",
                        user="ana", mode="dp", epsilon=1.0)
            parts = cells_by_column(r.cells)["n"]
            return [h - lo for lo, h in zip(parts["low"].to_pylist(), parts["high"].to_pylist())]
        grouped = widths("cert_ym = '2025-04'")
        ranged = widths("cert_ym >= '2025-04' AND cert_ym <= '2025-04'")
        dp = policy.disclosure.dp
        domain = len(policy.views["childcare"].columns["cert_type"].domain)
        assert len(set(grouped)) == 1 and len(set(ranged)) == 1
        # the half-width grows linearly with the sensitivity (discrete Laplace, same ε)
        assert ranged[0] / grouped[0] == pytest.approx(dp.max_rows_per_person / domain, rel=0.1)
    finally:
        g.close()


# ---- the fixing conditions after the join, as ibis writes a filter after a join -------------------

JOIN_ROWS = ("(SELECT c.cert_type, c.cert_ym, t.tax_year, t.income_levy FROM childcare c JOIN resident_tax t "
             "ON c.person_id = t.person_id) j")
AFTER = f"FROM {JOIN_ROWS} WHERE j.tax_year = 2025 AND j.cert_ym = '{MONTH}'"


def filter_after_join_sql(guard, analyst) -> str:
    """``cc.join(tax, ...).filter(...)`` in ibis: ``SELECT * FROM (<the join>) WHERE ...``."""
    cc, rt = ibis_table(guard, analyst, "childcare"), ibis_table(guard, analyst, "resident_tax")
    joined = cc.join(rt, cc.person_id == rt.person_id)
    joined = joined.filter((joined.tax_year == 2025) & (joined.cert_ym == MONTH))
    expr = joined.group_by("cert_type").aggregate(mean=joined.income_levy.mean(), total=joined.income_levy.sum(),
                                                  n=joined.count()).order_by("cert_type")
    sql = ibis.to_sql(expr, dialect="duckdb")
    assert sql.index(" ON ") < sql.index("WHERE")       # the filter is over the join's rows
    return sql


def test_the_month_fixed_after_the_join_gives_the_same_answer_as_in_the_where(guard, analyst):
    """The fixing conditions read through the subquery's outputs (renamed or not) decide the
    fan-out as the WHERE of the flat query does: the same rows per child and cell, so the
    same protected answer, cell statuses and conditions left out."""
    outputs = "SELECT {a}.cert_type, AVG({b}.{levy}) AS mean, SUM({b}.{levy}) AS total, COUNT(*) AS n"
    flat = guard.query(f"{outputs.format(a='c', b='t', levy='income_levy')} {JOINED} GROUP BY 1 ORDER BY 1",
                       user=analyst)
    renamed = (f"FROM (SELECT c.cert_type, c.cert_ym AS month, t.tax_year AS year, t.income_levy AS levy "
               f"FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id) j "
               f"WHERE j.year = 2025 AND j.month = '{MONTH}'")
    forms = {"after": f"{outputs.format(a='j', b='j', levy='income_levy')} {AFTER} GROUP BY 1 ORDER BY 1",
             "renamed": f"{outputs.format(a='j', b='j', levy='levy')} {renamed} GROUP BY 1 ORDER BY 1",
             "ibis": filter_after_join_sql(guard, analyst)}
    assert len(flat.table) == 3
    for name, sql in forms.items():
        got = guard.query(sql, user=analyst)
        assert got.table.to_pylist() == flat.table.to_pylist(), name
        for column in ("mean", "total", "n"):
            assert statuses_of(got, column) == statuses_of(flat, column), name
        assert len(got.summary["conditions_left_out"]) == len(flat.summary["conditions_left_out"]), name


def test_dp_after_the_join_has_the_bounds_of_the_flat_query(guard, analyst):
    """DP: the same contribution bounds (the noise's width) as the same-scope WHERE, both
    with the type fixed (one row per child) and grouped (the policy's bounds)."""
    def widths(sql: str) -> list[float]:
        r = guard.query(sql, user=analyst, mode="dp", epsilon=EPSILON)
        parts = cells_by_column(r.cells)["n"]
        return [round(h - lo, 6) for lo, h in zip(parts["low"].to_pylist(), parts["high"].to_pylist())]
    one = widths(f"SELECT COUNT(*) AS n {JOINED} AND c.cert_type = '3号'")
    assert one == widths(f"SELECT COUNT(*) AS n {AFTER} AND j.cert_type = '3号'")
    grouped = widths(f"SELECT c.cert_type, COUNT(*) AS n {JOINED} GROUP BY 1")
    assert grouped == widths(f"SELECT j.cert_type, COUNT(*) AS n {AFTER} GROUP BY 1")
    assert one[0] < grouped[0]


@pytest.mark.parametrize("where", [
    "",
    f"j.cert_ym = '{MONTH}'",                                    # the year not fixed, nor the type
    f"j.tax_year >= 2025 AND j.cert_ym >= '{MONTH}'",            # ranges fix nothing
    f"(j.tax_year = 2025 OR j.cert_ym = '{MONTH}')",
    f"NOT (j.tax_year <> 2025 OR j.cert_ym <> '{MONTH}')",
], ids=["none", "month-only", "ranges", "or", "not"])
def test_two_views_left_several_after_the_join_are_join_fan_out(guard, analyst, where):
    """Where the outer WHERE leaves two views with several rows per person, the scope that
    counts the join's rows refuses, as the flat query does (the year alone leaves one:
    a count is then bounded, a sum of the tax is not — ``test_fan_out_amplification_is_refused``)."""
    after = f"SELECT COUNT(*) AS n FROM {JOIN_ROWS}" + (f" WHERE {where}" if where else "")
    flat = ("SELECT COUNT(*) AS n FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id"
            + (" WHERE " + where.replace("j.tax_year", "t.tax_year").replace("j.", "c.") if where else ""))
    for sql in (flat, after):
        with pytest.raises(QueryRefused) as refused:
            guard.query(sql, user=analyst)
        assert refused.value.code == "join_fan_out", sql


def test_a_fixing_condition_after_the_join_is_refused_not_left_out(inst, policy):
    """As ``test_a_fixing_condition_that_changes_few_is_refused_not_left_out``, the month
    fixed one level above the join: it is a row identity there too."""
    _refused_for_the_month_under_k_100(inst, policy, f"SELECT COUNT(*) AS n {AFTER} AND j.cert_type = '1号'")


def test_a_join_partly_fixed_and_grouped_bounds_dp_noise_by_the_grouped_domain(inst, policy):
    # the linked question's form: the certification month and the tax year fixed, grouped
    # by 区分: each child has one joined row per 区分, in at most three cells (the domain),
    # so the noise is that of 3 rows; with the month as a range (fixing nothing) the same
    # join is refused or carries the policy's bounds, and the single-view query says 3 too
    g = Guard(inst)
    try:
        def widths(sql: str) -> list[float]:
            r = g.query(sql, user="ana", mode="dp", epsilon=1.0)
            parts = cells_by_column(r.cells)["n"]
            return [h - lo for lo, h in zip(parts["low"].to_pylist(), parts["high"].to_pylist())]
        joined = widths("SELECT c.cert_type, COUNT(*) AS n FROM childcare c JOIN resident_tax t "
                        "ON c.person_id = t.person_id WHERE c.cert_ym = '2025-04' AND t.tax_year = 2025 "
                        "GROUP BY c.cert_type")
        single = widths("SELECT cert_type, COUNT(*) AS n FROM childcare WHERE cert_ym = '2025-04' GROUP BY cert_type")
        assert len(set(joined)) == 1 and joined == single[:len(joined)]
        dp = policy.disclosure.dp
        domain = len(policy.views["childcare"].columns["cert_type"].domain)
        # the bound the policy would give, for comparison: the widths scale with it
        policy_wide = widths("SELECT cert_type, COUNT(*) AS n FROM childcare "
                             "WHERE cert_ym >= '2025-04' AND cert_ym <= '2025-04' GROUP BY cert_type")
        assert policy_wide[0] / joined[0] == pytest.approx(dp.max_rows_per_person / domain, rel=0.1)
    finally:
        g.close()


def test_a_join_bound_is_the_product_of_grouped_domains_and_none_without_one(inst, policy):
    """join_groups (what dp_bounds reads): the grouped identity column's domain size; one
    row in all (join_one_row) when every identity is fixed; None (the policy's bounds)
    when a grouped identity column declares no domain."""
    g = Guard(inst)
    snap = g.snapshots.current()

    def boundary(sql: str):
        plan = g.plans.plan(sql, user="ana", role="analyst", snapshot=snap.id, catalog=g._catalog("analyst", snap))
        (bp,) = plan.boundaries
        return bp
    join = "SELECT {keys}, COUNT(*) AS n FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id WHERE "
    try:
        bp = boundary(join.format(keys="c.cert_type") + "c.cert_ym = '2025-04' AND t.tax_year = 2025 GROUP BY 1")
        assert bp.join_groups == len(policy.views["childcare"].columns["cert_type"].domain)
        bp = boundary(join.format(keys="c.cert_type") + "c.cert_ym = '2025-04' AND c.cert_type = '2号' "
                      "AND t.tax_year = 2025 GROUP BY 1")
        assert bp.join_one_row and bp.join_groups is None
        tax_year = policy.views["resident_tax"].columns["tax_year"]
        bp = boundary(join.format(keys="c.cert_type, t.tax_year") + "c.cert_ym = '2025-04' GROUP BY 1, 2")
        expected = (len(policy.views["childcare"].columns["cert_type"].domain) * len(tax_year.domain)
                    if getattr(tax_year, "domain", None) else None)
        assert bp.join_groups == expected
    finally:
        g.close()
