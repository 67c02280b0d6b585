"""Attacks on the guard, one or more per family of DESIGN.md §2. Each test plays the
attacker with the guard's public API and asserts that what comes back carries no more
than the perturbation or the DP noise allows (the raw store is read only as the oracle).
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from guard_fixtures import BLOCKS, add_snapshot, make_instance, truth
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.cells import Bounding, cells_sql
from sekisho.guard.protect.dp import _fixed_point_sum, fixed_point_unit
from sekisho.policy import load_instance_policy


@pytest.fixture(scope="module")
def inst(own_city):
    """The attacks add analysts, raise alerts and exhaust budgets: a copy of the city of this
    module's own (``guard`` in conftest.py follows ``inst``)."""
    return own_city


def ask(guard, sql, user="ana", **kw):
    return guard.query(sql, user=user, **kw).table.to_pylist()


def count(guard, sql, **kw):
    rows = ask(guard, sql, **kw)
    return rows[0]["n"]


def code_of(guard, sql, user="ana", **kw):
    with pytest.raises(QueryRefused) as info:
        guard.query(sql, user=user, **kw)
    return info.value.code


def unique_targets(inst, limit=60):
    """Persons unique on (chome_code, age): the attacker knows where they live and how
    old they are and wants their sex."""
    return truth(inst, "SELECT chome_code, age, any_value(sex) FROM residents WHERE person_id LIKE 'p0%' "
                       "GROUP BY 1, 2 HAVING COUNT(*) = 1 ORDER BY 1, 2 LIMIT " + str(limit))


def padding(chome: str) -> str:
    # pad the target's chome with its neighbours so that every query passes k
    base = int(chome[-4:])
    codes = [f"282014{(base + d) % 150:04d}" for d in range(4)]
    return "(" + ", ".join(f"'{c}'" for c in codes) + ")"


# ---- differencing COUNT(P) - COUNT(P and not target) ------------------------------------------
def differencing_attack(guard, inst, user="ana", **mode):
    """The attacker knows each target's chome and age (unique) and wants the target's sex."""
    hits = raw_hits = total = female_hidden = 0
    diffs = []
    for chome, age, sex in unique_targets(inst):
        # P: all women; the target is excluded by what the attacker knows (chome and age).
        # (A P holding just about k women of the target's chome would put the exclusion at
        # the k boundary, where any noisy threshold leaks a little — see the guard's README.)
        p = "sex = '女'"
        q1 = f"SELECT COUNT(*) AS n FROM residents WHERE {p}"
        q2 = f"SELECT COUNT(*) AS n FROM residents WHERE {p} AND NOT (chome_code = '{chome}' AND age = {age})"
        try:
            diff = count(guard, q1, user=user, **mode) - count(guard, q2, user=user, **mode)
        except QueryRefused:
            continue
        raw = truth(inst, q1.replace("AS n", ""))[0][0] - truth(inst, q2.replace("AS n", ""))[0][0]
        total += 1
        diffs.append((diff, sex))
        hits += (diff >= 1) == (sex == "女")
        raw_hits += (raw >= 1) == (sex == "女")
        female_hidden += sex == "女" and diff == 0
    return hits, raw_hits, total, female_hidden, diffs


def test_differencing_one_person_reveals_nothing_in_threshold_mode(guard, inst):
    """COUNT(P) - COUNT(P AND NOT <target>): the excluding condition changes who is counted
    by one person (target in P) or nobody (target not in P) — fewer than k either way — so
    the guard leaves it out and answers both queries alike (condition-influence rule). The
    difference is 0 whatever the target's sex: the attacker learns nothing, and the answer
    says which condition was not applied."""
    hits, raw_hits, total, female_hidden, diffs = differencing_attack(guard, inst)
    assert total >= 30
    assert raw_hits == total                 # the attack is perfect on raw counts ...
    assert {d for d, _ in diffs} == {0}      # ... through the guard the answers never differ
    females = sum(sex == "女" for _, sex in diffs)
    assert 0 < females < total               # both cases occur among the targets
    assert hits == total - females           # so "guessing" is just the base rate
    chome, age, _ = unique_targets(inst)[0]
    r = guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '女' "
                    f"AND NOT (chome_code = '{chome}' AND age = {age})", user="ana")
    assert r.summary["conditions_left_out"]
    assert any("適用していません" in note for note in r.summary["notes_ja"])


def test_grouping_out_one_person_reveals_nothing(guard, inst):
    """The same attack through GROUP BY: a CASE that puts the target in a group of its own
    leaves the complement group equal to P minus the target. The CASE condition changes
    fewer than k persons, so it is left out: every person lands in the ELSE group, and the
    complement equals the total whether or not the target is in P."""
    equal = 0
    targets = unique_targets(inst, limit=20)
    for chome, age, _ in targets:
        p = f"chome_code IN {padding(chome)}"
        total = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE {p}")
        rows = ask(guard, f"SELECT CASE WHEN chome_code = '{chome}' AND age = {age} THEN 't' ELSE 'rest' END AS g, "
                          f"COUNT(*) AS n FROM residents WHERE {p} GROUP BY 1")
        rest = {r["g"]: r["n"] for r in rows}["rest"]
        equal += rest == total
    assert equal == len(targets)


def test_in_list_element_that_changes_one_person_is_left_out(guard, inst):
    """x IN (a, b, c): each element is a condition of its own; an element that adds fewer
    than k persons (here '100+': only the planted lone woman) is dropped, so the query
    answers as without it."""
    bands = "'20-24', '25-29', '30-34'"
    without = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE age_band IN ({bands})")
    with_extra = guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE age_band IN ({bands}, '100+')", user="ana")
    assert with_extra.table.to_pylist()[0]["n"] == without
    assert any("'100+'" in c for c in with_extra.summary["conditions_left_out"])


def test_conditions_that_change_many_persons_are_applied(guard, inst):
    r = guard.query("SELECT COUNT(*) AS n FROM residents WHERE age >= 65 AND sex = '女'", user="ana")
    assert r.summary["conditions_left_out"] == []
    true_n = truth(inst, "SELECT COUNT(*) FROM residents WHERE age >= 65 AND sex = '女'")[0][0]
    assert abs(r.table.to_pylist()[0]["n"] - true_n) <= guard.policy.disclosure.perturbation.max_noise


def test_differencing_is_a_coin_flip_in_dp_mode(inst):
    from sekisho.state import set_role

    set_role(inst, "dp_attacker", "analyst")
    g = Guard(inst)
    hits, raw_hits, total, _, _ = differencing_attack(g, inst, user="dp_attacker", mode="dp", epsilon=0.08)
    assert raw_hits == total and total >= 30
    assert hits / total < 0.75


# ---- trackers: pad a small set with a large one -----------------------------------------------
def test_tracker_padding_reveals_nothing_and_raises_an_alert(guard, inst):
    """Pad the lone target with a large tracker set, then subtract the tracker: the target's
    conditions change who is counted by one person, so they are left out, and every
    tracker estimates 0 for a true count of 1."""
    estimates = []
    target = "block = '家島' AND age_band = '100+'"  # the planted lone 100+ woman in 家島
    true_n = truth(inst, f"SELECT COUNT(*) FROM residents WHERE {target} AND sex = '女'")[0][0]
    bands = ["10-14", "15-19", "20-24", "25-29", "30-34", "35-39", "40-44", "45-49", "50-54", "55-59"]
    for i, j in itertools.combinations(range(len(bands)), 2):
        # a large padding set that excludes the target, different each time; each of its
        # conditions removes dozens of women, far from k, so only the target's are left out
        tracker = f"(age_band <> '{bands[i]}' AND age_band <> '{bands[j]}' AND age_band <> '100+')"
        both = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE sex = '女' AND (({target}) OR {tracker})")
        pad = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE sex = '女' AND {tracker}")
        estimates.append(both - pad)
    assert true_n == 1
    assert set(estimates) == {0}                         # the target never shows
    guard.flush()
    alerts = [e for e in inst.audit.entries(type="alert", user="ana") if e["details"]["alert"] == "near_duplicate"]
    assert alerts, "a burst of same-shape queries is flagged for review"


# ---- isolating WHERE on a near-unique column ---------------------------------------------------
def test_isolating_filters_are_refused(guard):
    assert code_of(guard, "SELECT COUNT(*) FROM residents WHERE chome_code = '2820149999'") == \
        "filter_population_below_k"
    assert code_of(guard, "SELECT COUNT(*) FROM residents WHERE person_id = 'p_rare'") == "privacy_unit_in_filter"
    assert code_of(guard, "SELECT COUNT(*) FROM resident_tax WHERE taxable_income = 9000000000") == \
        "measure_in_filter"
    # grouping by the near-unique column does not show the lone person either
    rows = ask(guard, "SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY 1")
    assert "2820149999" not in {r["chome_code"] for r in rows}


# ---- one-hot x column then mean -----------------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SELECT AVG(CASE WHEN sex = '女' THEN 1 ELSE 0 END) FROM residents WHERE block = '家島'",
    "SELECT SUM(CASE WHEN chome_code = '2820149999' THEN 1 ELSE 0 END) FROM residents",
    "SELECT block, SUM(age) FROM residents GROUP BY 1",
])
def test_one_hot_then_mean_is_refused(guard, sql):
    assert code_of(guard, sql) in ("aggregate_argument_not_allowed", "measure_mixed_with_dimension")


def test_conditional_mean_is_its_where_form(guard):
    """AVG(CASE WHEN c THEN measure END) was refused as one-hot-then-mean; it is now a
    conditional mean protected as its own cell: the same contributors as WHERE c, so the
    same released value (same cell key, same noise), and k applies to them (a sum of one
    person's measure: tests/test_guard_language_attacks.py::conditional_sum)."""
    conditional = ask(guard, "SELECT AVG(CASE WHEN block = '安富' THEN taxable_income END) AS m FROM resident_tax")
    filtered = ask(guard, "SELECT AVG(taxable_income) AS m FROM resident_tax WHERE block = '安富'")
    assert conditional == filtered and conditional[0]["m"] is not None


# ---- mean with one row removed / duplicated; record replication vs dominance --------------------
def test_dominant_contributor_is_hidden_even_when_rows_are_replicated(guard):
    plain = ask(guard, "SELECT AVG(taxable_income) AS m, SUM(taxable_income) AS s FROM resident_tax "
                       "WHERE tax_year = 2025 AND block = '安富'")
    assert plain == [{"m": None, "s": None}]
    # replicate every row through a join fan-out (40 facilities, 3 per block): the rich
    # person's rows multiply, but contributions are per person, so dominance still holds
    fan = ask(guard, "SELECT AVG(t.taxable_income) AS m FROM resident_tax t JOIN facilities f "
                     "ON t.block = f.block WHERE t.tax_year = 2025 AND t.block = '安富'")
    assert fan == [{"m": None}]
    assert code_of(guard, "SELECT AVG(taxable_income) FROM (SELECT * FROM resident_tax UNION ALL "
                          "SELECT * FROM resident_tax) t") == "set_operation_below_boundary"


def test_mean_with_one_row_removed_does_not_give_the_value(guard, inst):
    # remove one (known) person from a cell by a dimension condition and difference the sums
    errors = []
    for block in BLOCKS[1:8]:
        cell = f"tax_year = 2024 AND block = '{block}'"
        row = truth(inst, f"SELECT age_band, sex, any_value(taxable_income) FROM resident_tax WHERE {cell} "
                          "GROUP BY 1, 2 HAVING COUNT(*) = 1 LIMIT 1")
        if not row:
            continue
        band, sex, value = row[0]
        s1 = ask(guard, f"SELECT SUM(taxable_income) AS s FROM resident_tax WHERE {cell}")[0]["s"]
        s2 = ask(guard, f"SELECT SUM(taxable_income) AS s FROM resident_tax WHERE {cell} "
                        f"AND NOT (age_band = '{band}' AND sex = '{sex}')")[0]["s"]
        if s1 is None or s2 is None:
            continue
        errors.append(abs((s1 - s2) - value) / value)
    assert errors
    # the difference is off by a noise of the order of the largest contribution of each cell
    assert statistics.median(errors) > 0.05


# ---- reconstruction from many overlapping counts -------------------------------------------------
def test_reconstruction_from_cumulative_counts_is_not_exact(guard, inst):
    area = "chome_code IN ('2820140001', '2820140002', '2820140003', '2820140004', '2820140005')"
    answers = {}
    for a in range(0, 100):
        try:
            n = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE {area} AND age >= {a}")
        except QueryRefused:
            break
        if n is None:  # suppressed: fewer than k persons
            break
        answers[a] = n
    exact = total = 0
    for a in range(0, max(answers)):
        estimate = answers[a] - answers[a + 1]
        true_n = truth(inst, f"SELECT COUNT(*) FROM residents WHERE {area} AND age = {a}")[0][0]
        if true_n == 0:
            # identical contributing sets give identical answers by design (consistency),
            # so an empty age differences to exactly 0: a documented residual risk
            assert estimate == 0
            continue
        total += 1
        exact += estimate == true_n
    assert total >= 15
    assert exact / total < 0.5


# ---- averaging repeated queries and different-but-equivalent queries -----------------------------
def test_repeated_queries_return_the_same_answer(guard):
    answers = {count(guard, "SELECT COUNT(*) AS n FROM residents WHERE age >= 70") for _ in range(50)}
    assert len(answers) == 1


def test_averaging_1000_equivalent_rephrasings_does_not_converge(guard, inst):
    for threshold in range(60, 90):
        base = f"SELECT COUNT(*) AS n FROM residents WHERE age >= {threshold}"
        released = count(guard, base)
        true_n = truth(inst, base.replace("AS n", ""))[0][0]
        if released != true_n:
            break
    else:
        pytest.fail("no perturbed cell found")
    forms = []
    for i in range(1000):
        dummy = [f"AND age <> -{i + 1}", f"AND NOT age < {threshold}", f"AND block <> 'x{i}'",
                 f"AND sex IN ('男', '女', 'z{i}')"][i % 4]
        wrap = i % 3
        inner = f"SELECT person_id, age FROM residents WHERE age >= {threshold} {dummy}"
        if wrap == 0:
            sql = f"SELECT COUNT(*) AS n FROM ({inner}) t"
        elif wrap == 1:
            sql = f"WITH c AS ({inner}) SELECT COUNT(person_id) AS n FROM c"
        else:
            sql = f"SELECT COUNT(DISTINCT person_id) AS n FROM residents WHERE age >= {threshold} {dummy}"
        forms.append(count(guard, sql))
    assert set(forms) == {released}
    assert statistics.mean(forms) != true_n


def test_join_fan_out_does_not_give_a_fresh_draw(guard):
    plain = ask(guard, "SELECT idou_type, COUNT(DISTINCT person_id) AS n FROM movements GROUP BY 1")
    fanned = ask(guard, "SELECT m.idou_type, COUNT(DISTINCT m.person_id) AS n FROM movements m JOIN facilities f "
                        "ON m.block = f.block GROUP BY 1")
    assert plain == fanned


# ---- zero / 100 % cells --------------------------------------------------------------------------
def test_zero_and_small_cells_look_the_same(guard, inst):
    rows = ask(guard, "SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2, 3")
    true = {(b, a, s): n for b, a, s, n in truth(inst, "SELECT block, age_band, sex, COUNT(*) FROM residents "
                                                       "GROUP BY 1, 2, 3")}
    zero = [r for r in rows if true.get((r["block"], r["age_band"], r["sex"]), 0) == 0]
    small = [r for r in rows if 0 < true.get((r["block"], r["age_band"], r["sex"]), 0) < 10]
    assert zero and small
    assert {r["n"] for r in zero} == {None} == {r["n"] for r in small}
    # the planted lone 100+ woman of 家島 is in a NULL cell, like the empty 100+ men's cell
    lone = [r for r in rows if (r["block"], r["age_band"]) == ("家島", "100+")]
    assert [r["n"] for r in lone] == [None, None]


# ---- back-calculating suppressed cells from totals -----------------------------------------------
def test_back_calculation_from_totals_is_not_exact(guard, inst):
    exact = total = 0
    for block in BLOCKS:
        cells = ask(guard, f"SELECT age_band, COUNT(*) AS n FROM residents WHERE block = '{block}' GROUP BY 1")
        block_total = count(guard, f"SELECT COUNT(*) AS n FROM residents WHERE block = '{block}'")
        released = sum(r["n"] for r in cells if r["n"] is not None)
        hidden = truth(inst, f"SELECT COUNT(*) FROM (SELECT age_band, COUNT(*) c FROM residents "
                             f"WHERE block = '{block}' GROUP BY 1 HAVING c < 10) "
                             f"JOIN residents USING (age_band) WHERE block = '{block}'")[0][0]
        total += 1
        exact += (block_total - released) == hidden
    assert exact / total < 0.5
    assert code_of(guard, "SELECT block, COUNT(*) FROM residents GROUP BY ROLLUP (block)") == "grouping_sets"
    assert code_of(guard, "SELECT block, COUNT(*) FROM residents GROUP BY GROUPING SETS ((block), ())") == \
        "grouping_sets"


# ---- MIN / MAX / range ---------------------------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SELECT MIN(age) FROM residents",
    "SELECT MAX(taxable_income) FROM resident_tax",
    "SELECT MAX(age) - MIN(age) FROM residents WHERE block = '家島'",
    "SELECT ARG_MAX(person_id, age) FROM residents",
    "SELECT FIRST(age) FROM residents",
    "SELECT block, MAX(age) FROM residents GROUP BY 1",
])
def test_min_max_and_range_are_refused(guard, sql):
    assert code_of(guard, sql) in ("aggregate_not_allowed", "function_not_allowed")


# ---- multiple rows per person / join fan-out inflating DP sensitivity ----------------------------
def test_dp_bounding_caps_rows_and_groups_per_person(guard, inst):
    snap = guard.snapshots.current()
    catalog = guard._catalog("analyst", snap)
    plan = guard.plans.plan("SELECT m.idou_type, COUNT(*) AS n FROM movements m JOIN facilities f "
                       "ON m.block = f.block GROUP BY 1", user="ana", role="analyst", snapshot=snap.id,
                       catalog=catalog)
    bp = plan.boundaries[0]
    sql = cells_sql(bp, person_unique=False, bounding=Bounding(max_groups=1, max_rows=1, clamp={}), dominance=False)
    cells = snap.cursor().execute(sql).fetchall()
    rows_counted = sum(r[3] for r in cells)          # __x0 = COUNT(*) per cell
    persons = truth(inst, "SELECT COUNT(DISTINCT person_id) FROM movements")[0][0]
    fanout = truth(inst, "SELECT COUNT(*) FROM movements m JOIN facilities f ON m.block = f.block")[0][0]
    assert fanout > persons                          # the join multiplies rows ...
    assert rows_counted == persons                   # ... the bound keeps one row per person


# ---- spoofing the guard's hidden columns ----------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SELECT idou_type, COUNT(*) FROM (SELECT idou_type, idou_ym AS __pid FROM movements) t GROUP BY 1",
    "SELECT COUNT(*) FROM (SELECT block, 0 AS __rkey FROM residents) t",
    'SELECT COUNT(*) FROM (SELECT block AS "__pid" FROM residents) AS "__b0"',
])
def test_hidden_column_names_cannot_be_spoofed(guard, sql):
    assert code_of(guard, sql) == "reserved_name"


# ---- subquery / IN / EXISTS / UNION / window bypasses --------------------------------------------
@pytest.mark.parametrize("sql, code", [
    # IN / EXISTS on the person key are semi-joins (issue 18, tests/test_guard_join_attacks.py):
    # their conditions are row-level conditions, so a measure there is refused as in WHERE
    ("SELECT COUNT(*) FROM residents WHERE person_id IN (SELECT person_id FROM resident_tax "
     "WHERE taxable_income > 1e9)", "measure_in_filter"),
    ("SELECT COUNT(*) FROM residents r WHERE EXISTS (SELECT 1 FROM resident_tax t WHERE t.person_id = r.person_id "
     "AND t.income_levy > 0)", "measure_in_filter"),
    ("SELECT COUNT(*) FROM residents r WHERE EXISTS (SELECT 1 FROM resident_tax t WHERE t.block = r.block)",
     "personal_join"),
    ("SELECT (SELECT COUNT(*) FROM residents) AS n", "subquery_in_expression"),
    ("SELECT block FROM residents UNION SELECT block FROM facilities", "set_operation_below_boundary"),
    ("SELECT COUNT(*) FROM (SELECT person_id FROM residents INTERSECT SELECT person_id FROM resident_tax)",
     "set_operation_below_boundary"),
    ("SELECT block, COUNT(*) OVER (PARTITION BY block) FROM residents", "window_below_boundary"),
    ("SELECT COUNT(*) FROM residents QUALIFY ROW_NUMBER() OVER () = 1", "window_below_boundary"),
    ("SELECT r.block, COUNT(*) FROM residents r JOIN (SELECT block, COUNT(*) AS c FROM residents GROUP BY 1) a "
     "ON r.block = a.block GROUP BY 1", "nested_aggregation"),
])
def test_bypasses_are_refused(guard, sql, code):
    assert code_of(guard, sql) == code


# ---- budget reset and caller-chosen epsilon ------------------------------------------------------
def test_budget_cannot_be_reset_and_huge_epsilon_is_refused(inst):
    policy = load_instance_policy(inst)
    cap = policy.disclosure.dp.epsilon_per_query_max
    total = policy.disclosure.dp.budget_per_period
    g = Guard(inst)
    for eps in (1e20, float("inf"), float("nan"), -1.0, 0.0, cap * 1.5):
        assert code_of(g, "SELECT COUNT(*) AS n FROM residents", user="ana2", mode="dp", epsilon=eps) == \
            "epsilon_invalid"
    spent = g.budget("ana2")["spent"]
    views = ["residents", "movements", "resident_tax", "childcare"]
    i = 0
    while spent + cap <= total + 1e-9:
        view = views[i % len(views)]
        Guard(inst).query(f"SELECT COUNT(*) AS n FROM {view}", user="ana2", mode="dp", epsilon=cap)  # new session
        spent += cap
        i += 1
    for view in views:  # a new view, a new Guard (restart): still exhausted
        assert code_of(Guard(inst), f"SELECT COUNT(*) FROM {view}", user="ana2", mode="dp", epsilon=cap) == \
            "budget_exhausted"
    assert Guard(inst).budget("ana2")["remaining"] < cap


def test_repeated_dp_queries_are_limited_by_the_budget(inst):
    g = Guard(inst)
    answers = []
    with pytest.raises(QueryRefused) as info:
        for _ in range(100):
            answers.append(count(g, "SELECT COUNT(*) AS n FROM residents WHERE age >= 70", user="rep2",
                                 mode="dp", epsilon=1.0))
    assert info.value.code == "budget_exhausted"
    assert len(answers) <= 10 and len(set(answers)) > 1   # fresh noise, but only as much as the budget buys


@pytest.fixture(scope="module", autouse=True)
def _second_analyst(inst):
    from sekisho.state import set_role
    set_role(inst, "rep2", "analyst")


# ---- rare-group existence through GROUP BY keys --------------------------------------------------
def test_rare_group_does_not_appear_in_dp_output(guard):
    rows = ask(guard, "SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY 1", mode="dp", epsilon=1.0)
    assert "2820149999" not in {r["chome_code"] for r in rows}
    banded = ask(guard, "SELECT CASE WHEN age >= 100 THEN 'centenarian' ELSE 'other' END AS g, COUNT(*) AS n "
                        "FROM residents WHERE block = '家島' GROUP BY 1", mode="dp", epsilon=1.0)
    assert "centenarian" not in {r["g"] for r in banded}


# ---- side channels: error text, budget state ------------------------------------------------------
def test_refusal_text_does_not_depend_on_data(guard):
    a = code_of(guard, "SELECT COUNT(*) FROM residents WHERE chome_code = '2820149999'")       # 1 person
    b = code_of(guard, "SELECT COUNT(*) FROM residents WHERE chome_code = 'no-such-place'")    # 0 persons
    assert a == b == "filter_population_below_k"
    # a cast that would fail on some value is not accepted at all (it was rewritten to
    # TRY_CAST, whose NULLs acted as a hidden condition): refused before anything runs
    assert code_of(guard, "SELECT COUNT(*) AS n FROM residents WHERE CAST(block AS INTEGER) IS NULL") == \
        "expression_not_allowed"


def test_budget_debit_does_not_depend_on_data(inst):
    g = Guard(inst)
    from sekisho.state import set_role
    set_role(inst, "ana3", "analyst")
    g.query("SELECT COUNT(*) AS n FROM residents WHERE block = '家島'", user="ana3", mode="dp", epsilon=0.25)
    a = g.budget("ana3")["spent"]
    g.query("SELECT COUNT(*) AS n FROM residents WHERE block = 'nowhere'", user="ana3", mode="dp", epsilon=0.25)
    assert g.budget("ana3")["spent"] - a == pytest.approx(a)


# ---- floating-point attacks on Laplace ------------------------------------------------------------
def test_dp_sums_are_released_on_a_fixed_point_lattice():
    # issue 18: the sum is rounded to a power-of-two unit u (2^-20 of the sensitivity),
    # integer discrete Laplace noise is added, and the result is that integer times u:
    # every output is an exact multiple of u, so low-order bits carry nothing about the
    # input (the floating-point defence Snapping gave, without its grid of ~Λ >= noise scale)
    eps, sens = 0.5, 1000.0
    unit = fixed_point_unit(sens)
    assert math.log2(unit) == int(math.log2(unit)) and sens / 2 ** 21 < unit <= sens / 2 ** 20
    out = _fixed_point_sum(np.full(400, 123456.789), eps, sens)
    assert all(v / unit == round(v / unit) for v in out)
    assert len(set(out)) > 100   # not collapsed onto a coarse grid


# ---- differencing across data updates -------------------------------------------------------------
def test_differencing_across_updates(tmp_path):
    inst = make_instance(tmp_path / "upd", persons=1500, seed=3)
    g = Guard(inst)
    sql = "SELECT block, COUNT(*) AS n FROM residents GROUP BY block"
    before = {r["block"]: r["n"] for r in ask(g, sql)}
    diffs, unchanged_moved, unchanged, only_newcomer_moved = [], 0, 0, 0
    for i in range(12):
        block = BLOCKS[i]
        add_snapshot(inst, [(f"new{i}", f"hnew{i}", "男", 30, "30-34", "世帯主", "2820140001", block, True,
                             (i * 37 + 11) % 256)])
        after = {r["block"]: r["n"] for r in ask(g, sql)}
        assert {r["block"]: r["n"] for r in ask(g, sql)} == after   # consistent within the snapshot
        # issue 15: each snapshot has its own perturbation table, so the blocks the upload
        # left unchanged get a fresh draw too and the newcomer's block is not the one that moved
        unchanged_moved += sum(after[b] != before[b] for b in after if b != block)
        unchanged += len(after) - 1
        only_newcomer_moved += [b for b in after if after[b] != before[b]] == [block]
        diffs.append(after[block] - before[block])
        before = after
    assert unchanged_moved / unchanged > 0.5   # two independent draws agree with probability ~0.27
    assert only_newcomer_moved == 0
    # one person joined each time; the released difference is 1 only by chance
    assert sum(d != 1 for d in diffs) >= 3
    g.close()
