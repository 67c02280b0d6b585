"""Answers that explain themselves (issue 19, item 1): every value carries its status
(``released``, ``suppressed_k``, ``suppressed_dominance``) and its accuracy (±D for
threshold counts, ±r·value for non-negative threshold sums, a 95% interval per DP
value), from the guard through post-processing and over the wire; densification stays
within the query's own filters as answered (after condition influence).

Tolerances come from the policy (D, k) and the mechanisms' parameters, never from
constants: the lead may change the policy's noise.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pytest

from guard_fixtures import BANDS, BLOCKS, truth
from sekisho.guard.protect import dp, status
from sekisho.guard.protect.cellkey import SUM_NOISE_FRACTION
from sekisho.policy import load_instance_policy
from sekisho.protocol import QueryRequest, cells_by_column, split_cells


@pytest.fixture(scope="module")
def inst(own_city):
    """A private copy of the city: DP coverage needs many runs (a large budget)."""
    text = own_city.policy_path.read_text(encoding="utf-8")
    own_city.policy_path.write_text(re.sub(r"(?m)^(\s+budget_per_period:).*$", r"\1 100000.0", text),
                                    encoding="utf-8")
    return own_city


@pytest.fixture(scope="module")
def policy(inst):
    return load_instance_policy(inst)


def cells_of(result) -> dict[str, dict[str, list]]:
    assert result.cells is not None and result.cells.num_rows == result.table.num_rows
    return {name: {part: (entry[part].to_pylist() if part in ("status", "low", "high") else entry[part])
                   for part in entry} for name, entry in cells_by_column(result.cells).items()}


def rows_with_cells(result) -> list[dict]:
    cells = cells_of(result)
    out = []
    for i, row in enumerate(result.table.to_pylist()):
        for name, parts in cells.items():
            row[f"{name}:status"] = parts["status"][i]
            row[f"{name}:low"] = parts["low"][i]
            row[f"{name}:high"] = parts["high"][i]
        out.append(row)
    return out


# ---- threshold mode: statuses and ±D --------------------------------------------------------------

def test_every_count_has_its_status_and_the_cell_key_bound(guard, inst, policy):
    d, k = policy.disclosure.perturbation.max_noise, policy.disclosure.k
    assert guard.ptable.max_noise == d
    r = guard.query("SELECT block, age_band, COUNT(*) AS n FROM residents GROUP BY block, age_band", user="ana")
    assert r.table.column_names == ["block", "age_band", "n"]      # the answer keeps its columns
    true = {(b, a): n for b, a, n in truth(inst, "SELECT block, age_band, COUNT(*) FROM residents GROUP BY 1, 2")}
    rows = rows_with_cells(r)
    assert len(rows) == len(BLOCKS) * len(BANDS)
    seen, suppressed_true = set(), set()
    for row in rows:
        n_true = true.get((row["block"], row["age_band"]), 0)
        seen.add(row["n:status"])
        if row["n"] is None:
            # zero and small alike: suppressed_k, no interval
            assert row["n:status"] == status.SUPPRESSED_K and row["n:low"] is None and row["n:high"] is None
            suppressed_true.add(min(n_true, 1))
            continue
        assert row["n:status"] == status.RELEASED and n_true >= k
        assert row["n:high"] == row["n"] + d and row["n:low"] == max(row["n"] - d, 0)
        assert row["n:low"] <= n_true <= row["n:high"]
    assert seen == {status.RELEASED, status.SUPPRESSED_K}
    assert suppressed_true == {0, 1}     # empty and small cells were both there, and look the same
    assert r.summary["accuracy"]["count_max_noise"] == d
    assert r.summary["accuracy"]["columns"] == {"n": status.CELL_KEY}


def test_dominated_sums_are_marked_and_released_sums_lie_within_their_bound(guard, inst, policy):
    """The planted taxpayer dominates 安富 in 2025: suppressed_dominance; every released
    sum's interval (±r·value, r from the public parameters) holds the true sum."""
    nk_k = policy.disclosure.dominance.nk_k
    r = guard.query("SELECT block, age_band, COUNT(*) AS n, SUM(income_levy) AS s, AVG(income_levy) AS m "
                    "FROM resident_tax WHERE tax_year = 2025 GROUP BY block, age_band", user="ana")
    true = {(b, a): s for b, a, s in truth(inst, "SELECT block, age_band, SUM(income_levy) FROM resident_tax "
                                                 "WHERE tax_year = 2025 GROUP BY 1, 2")}
    rel = status.sum_relative_bound(SUM_NOISE_FRACTION, nk_k)
    released = widened = 0
    for row in rows_with_cells(r):
        if row["s:status"] == status.RELEASED:
            released += 1
            assert row["s:high"] == pytest.approx(row["s"] * (1 + rel))
            assert row["s:low"] <= true[(row["block"], row["age_band"])] <= row["s:high"]
        elif row["s:status"] == status.WIDENED:
            # answered without ``tax_year = 2025`` where it changes fewer than k persons
            # (cell_widening): a sum of the wider question, with no interval stated
            widened += 1
            assert row["s"] is not None and row["s:low"] is None and row["s:high"] is None
        else:
            assert row["s"] is None and row["s:low"] is None
        assert row["m:low"] is None and row["m:high"] is None           # means: no interval stated
        assert (row["m"] is None) == (row["m:status"] not in (status.RELEASED, status.WIDENED))
    assert released > 20, (released, widened)
    by_block = r.summary["accuracy"]["columns"]
    assert by_block == {"n": status.CELL_KEY, "s": status.SUM_RELATIVE, "m": status.NO_INTERVAL}
    one = guard.query("SELECT block, SUM(income_levy) AS s FROM resident_tax WHERE tax_year = 2025 GROUP BY block",
                      user="ana")
    st = dict(zip(one.table.column("block").to_pylist(), cells_of(one)["s"]["status"]))
    assert st["安富"] == status.SUPPRESSED_DOMINANCE
    assert {v for b, v in st.items() if b != "安富"} == {status.RELEASED}


def test_a_value_computed_from_a_suppressed_cell_is_suppressed_and_keys_have_no_status(guard):
    sql = ("SELECT a.block, a.n, b.n AS n100, a.n - b.n AS rest FROM "
           "(SELECT block, COUNT(*) AS n FROM residents GROUP BY block) AS a JOIN "
           "(SELECT block, COUNT(*) AS n FROM residents WHERE age >= 60 AND sex = '女' GROUP BY block) AS b "
           "ON a.block = b.block ORDER BY a.block")
    r = guard.query(sql, user="ana")
    cells = cells_of(r)
    assert set(cells) == {"n", "n100", "rest"}                 # the key column carries no status
    assert cells["rest"]["accuracy"] == status.NO_INTERVAL
    for i, row in enumerate(r.table.to_pylist()):
        if row["n100"] is None:
            assert cells["rest"]["status"][i] == status.SUPPRESSED_K and row["rest"] is None
        else:
            assert cells["rest"]["status"][i] == status.RELEASED
            assert cells["n100"]["low"][i] <= row["n100"] <= cells["n100"]["high"][i]


def test_aggregates_above_the_boundaries_carry_their_inputs_status(guard):
    # SUM/MAX over counts by sex, grouped by block: a block whose cells were all
    # released is released, one with some suppressed is partial (the sum leaves them out),
    # and the key and COUNT(*) (a count of rows, no protected value) carry none
    inner = "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= 85 GROUP BY block, sex"
    parts = guard.query(inner, user="ana")
    by_block: dict[str, list[str]] = {}
    for row, st in zip(parts.table.to_pylist(), cells_of(parts)["n"]["status"]):
        by_block.setdefault(row["block"], []).append(st)
    r = guard.query(f"SELECT block, SUM(n) AS total, MAX(n) AS top, COUNT(*) AS chomes FROM ({inner}) AS t "
                    "GROUP BY block ORDER BY block", user="ana")
    cells = cells_of(r)
    assert set(cells) == {"total", "top"}
    expected = {b: status.RELEASED if all(s == status.RELEASED for s in sts) else
                status.PARTIAL if any(s == status.RELEASED for s in sts) else sts[0] for b, sts in by_block.items()}
    got = dict(zip(r.table.column("block").to_pylist(), cells["total"]["status"]))
    assert got == expected
    assert set(got.values()) >= {status.RELEASED, status.PARTIAL}     # the city has both kinds of block
    assert cells["top"]["status"] == cells["total"]["status"] and cells["total"]["accuracy"] == status.NO_INTERVAL
    # the same over the whole table, and an aggregate of an expression of protected values
    whole = guard.query(f"SELECT SUM(n) AS total, SUM(n * 2) AS twice FROM ({inner}) AS t", user="ana")
    assert cells_of(whole)["total"]["status"] == [status.PARTIAL] == cells_of(whole)["twice"]["status"]


def test_the_summary_says_what_each_condition_left_out_was_answered_as(guard, inst):
    # an OR branch isolating one person is answered as never holding (FALSE), a conjunct
    # removing one person as always holding (TRUE): "not applied" alone would not say which
    chome, age = truth(inst, "SELECT chome_code, age FROM residents GROUP BY 1, 2 HAVING COUNT(*) = 1 "
                             "ORDER BY 1, 2 LIMIT 1")[0]
    r = guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE (sex = '女' OR chome_code = '{chome}' AND age = {age}) "
                    f"AND NOT (block = '灘' AND age = 101)", user="ana")
    answered = {e["condition"]: e["as"] for e in r.summary["conditions_left_out_as"]}
    assert answered[f'"residents"."chome_code" = \'{chome}\''] == "FALSE"
    assert answered['"residents"."age" = 101'] == "FALSE"      # nobody is 101: NOT (... AND FALSE) holds
    assert [e["condition"] for e in r.summary["conditions_left_out_as"]] == r.summary["conditions_left_out"]
    assert any("成り立たないものとして集計" in n for n in r.summary["notes_ja"])


# ---- densification within the query's own filters -------------------------------------------------

def test_age_at_least_97_gives_ages_97_to_100_only_with_suppressed_cells_present(guard, inst):
    r = guard.query("SELECT age, COUNT(*) AS n FROM residents WHERE age >= 97 GROUP BY age ORDER BY age",
                    user="ana")
    rows = rows_with_cells(r)
    assert [row["age"] for row in rows] == [97, 98, 99, 100]    # 0..96 are outside the query: absent
    by_age = {row["age"]: row for row in rows}
    # the planted lone 100-year-old: a cell that exists and is suppressed, not absent
    assert by_age[100]["n"] is None and by_age[100]["n:status"] == status.SUPPRESSED_K
    true = dict(truth(inst, "SELECT age, COUNT(*) FROM residents WHERE age >= 97 GROUP BY 1"))
    for age, row in by_age.items():
        # released, or widened (age >= 97 changes nobody in these cells: every one is
        # marked alike); the count asked for within the stated interval either way
        assert (row["n:status"] in (status.RELEASED, status.WIDENED)) == (true.get(age, 0) >= 10)
        if row["n"] is not None:
            assert row["n:low"] <= true[age] <= row["n:high"], (age, row)
    assert r.summary["cells"] == 4 and any("条件" in n for n in r.summary["notes_ja"])
    # the same through an ibis-style derived table
    ibis_sql = ('SELECT * FROM (SELECT "t1"."age", COUNT(*) AS "n" FROM (SELECT * FROM "residents" AS "t0" '
                'WHERE "t0"."age" >= 97) AS "t1" GROUP BY 1) AS "t2" ORDER BY "t2"."age" ASC')
    assert [row["age"] for row in guard.query(ibis_sql, user="ana").table.to_pylist()] == [97, 98, 99, 100]


def test_a_condition_left_out_does_not_narrow_the_grid(guard):
    """``age <> 100`` excludes one person: condition influence leaves it out, and the
    answer is the whole domain (age 100 included, suppressed) — densified as answered."""
    r = guard.query("SELECT age, COUNT(*) AS n FROM residents WHERE age <> 100 GROUP BY age", user="ana")
    assert r.summary["conditions_left_out"], r.summary
    ages = r.table.column("age").to_pylist()
    assert 100 in ages and len(ages) == 101
    kept = guard.query("SELECT age, COUNT(*) AS n FROM residents WHERE age < 50 GROUP BY age", user="ana")
    assert kept.table.column("age").to_pylist() == list(range(50)) and not kept.summary["conditions_left_out"]


def test_filters_over_other_columns_or_mixed_do_not_narrow(guard):
    r = guard.query("SELECT sex, COUNT(*) AS n FROM residents WHERE age >= 30 OR sex = '男' GROUP BY sex",
                    user="ana")
    assert sorted(r.table.column("sex").to_pylist()) == ["女", "男"]
    # an OR across columns: rows of every age can pass (灘's), so every age stays on the grid
    r = guard.query("SELECT age, COUNT(*) AS n FROM residents WHERE age >= 97 OR block = '灘' GROUP BY age",
                    user="ana")
    assert r.table.column("age").to_pylist() == list(range(101))
    r = guard.query("SELECT sex, block, COUNT(*) AS n FROM residents WHERE block IN ('灘', '網干') GROUP BY sex, block",
                    user="ana")
    assert sorted(set(r.table.column("block").to_pylist())) == ["灘", "網干"] and r.table.num_rows == 4


# ---- DP: 95% intervals ------------------------------------------------------------------------------

def coverage(pairs: list[tuple[float, float, float]]) -> float:
    return sum(lo <= t <= hi for t, lo, hi in pairs) / len(pairs)


def test_dp_count_intervals_cover_the_truth_at_the_nominal_rate(guard, inst):
    eps = 0.1
    true = {(b, a): n for b, a, n in truth(inst, "SELECT block, age_band, COUNT(*) FROM residents GROUP BY 1, 2")}
    pairs = []
    for _ in range(5):
        r = guard.query("SELECT block, age_band, COUNT(*) AS n FROM residents GROUP BY block, age_band",
                        user="ana", mode="dp", epsilon=eps)
        for row in rows_with_cells(r):
            assert row["n:status"] == status.RELEASED
            pairs.append((true.get((row["block"], row["age_band"]), 0), row["n:low"], row["n:high"]))
    assert len(pairs) >= 1000
    # the stated half-width is the mechanism's: P(|Z| <= t) >= 95% > P(|Z| <= t - 1)
    half = (pairs[0][2] - pairs[0][1]) / 2
    num, den = dp._ratio(eps, 1)
    a = math.exp(-num / den)
    assert 2 * a ** (half + 1) / (1 + a) <= 0.05 < 2 * a ** half / (1 + a)
    rate = coverage(pairs)
    assert 0.93 <= rate <= 0.97, (rate, len(pairs))
    assert r.summary["accuracy"]["confidence"] == 0.95


def test_dp_sum_intervals_cover_the_clamped_truth_and_means_at_least_nominally(guard, inst, policy):
    lo, hi = policy.views["resident_tax"].columns["income_levy"].bounds
    clamped = f"LEAST(GREATEST(income_levy, {lo}), {hi})"
    true = {(b, a, s): (t, m) for b, a, s, t, m in truth(
        inst, f"SELECT block, age_band, sex, SUM({clamped}), AVG({clamped}) FROM resident_tax "
              f"WHERE tax_year = 2025 GROUP BY 1, 2, 3")}
    sums, means = [], []
    for _ in range(2):
        r = guard.query("SELECT block, age_band, sex, SUM(income_levy) AS s, AVG(income_levy) AS m FROM resident_tax "
                        "WHERE tax_year = 2025 GROUP BY block, age_band, sex", user="ana", mode="dp", epsilon=0.5)
        for row in rows_with_cells(r):
            t_sum, t_mean = true.get((row["block"], row["age_band"], row["sex"]), (0, None))
            sums.append((t_sum, row["s:low"], row["s:high"]))
            if t_mean is not None and row["m"] is not None:
                assert lo <= row["m:low"] <= row["m:high"] <= hi
                means.append((t_mean, row["m:low"], row["m:high"]))
    assert len(sums) >= 1000
    rate = coverage(sums)
    assert 0.93 <= rate <= 0.97, (rate, len(sums))
    # a mean's interval combines the sum's and the count's 97.5% intervals: >= 95%
    assert len(means) > 200 and coverage(means) >= 0.95


def test_dp_groups_below_the_selection_threshold_are_absent_and_the_summary_says_why_not_how_many(guard):
    r = guard.query("SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY chome_code", user="ana", mode="dp",
                    epsilon=0.2)
    notes = " ".join(r.summary["notes_ja"])
    assert "表示していません" in notes and "数もお知らせしません" in notes and "ε は同じだけ使われます" in notes
    assert r.summary["cells"] == r.table.num_rows          # nothing counts what is not shown
    assert "rows_dropped" not in r.summary
    assert set(cells_of(r)["n"]["status"]) <= {status.RELEASED}


# ---- over the wire ---------------------------------------------------------------------------------

def test_cells_travel_in_the_arrow_answer_and_the_json_answer(guard):
    import json

    from sekisho.services.guard import answer

    sql = "SELECT block, COUNT(*) AS n FROM residents WHERE age >= 90 GROUP BY block"
    direct = guard.query(sql, user="ana")
    encoded = answer(guard, QueryRequest(sql=sql), "ana")
    with pa.ipc.open_stream(encoded.body) as reader:
        table = reader.read_all()
    table, cells = split_cells(table)
    assert table.column_names == ["block", "n"] and cells is not None
    assert cells.equals(direct.cells)
    assert cells_by_column(cells)["n"]["accuracy"] == status.CELL_KEY
    body = json.loads(answer(guard, QueryRequest(sql=sql, format="json"), "ana").body)
    assert [c["name"] for c in body["columns"]] == ["block", "n"]
    statuses = [row[0] for row in body["cells"]["rows"]]
    assert statuses == cells.column("n:status").to_pylist()
    assert body["cells"]["columns"][0] == {"name": "n:status", "column": "n", "part": "status",
                                           "accuracy": status.CELL_KEY}


def test_the_half_width_is_the_smallest_with_95_percent():
    for alpha in (0.0, 0.3, 0.9, 0.999, 1 - 1e-9):
        t = status.discrete_laplace_half_width(alpha)
        assert 2 * alpha ** (t + 1) / (1 + alpha) <= 0.05
        assert t == 0 or 2 * alpha ** t / (1 + alpha) > 0.05
    with pytest.raises(ValueError):
        status.discrete_laplace_half_width(1.0)
    low, high = status.interval_ratio(np.array([10.0, 10.0]), np.array([20.0, 20.0]), np.array([2.0, -1.0]),
                                      np.array([4.0, 3.0]), 0.0, 8.0)
    assert low.tolist() == [2.5, 0.0] and high.tolist() == [8.0, 8.0]
