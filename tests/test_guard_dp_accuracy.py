"""DP at the accuracy the data allows (issue 18, item 4).

Every tolerance here is computed from the mechanism's parameters: the noise is discrete
Laplace with P(z) ∝ α^|z|, α = exp(-ε'/Δ), whose moments are E Z² = 2α/(1-α)² and
E Z⁴ = 2α(1+10α+α²)/(1-α)⁴, so a mean of N draws has standard error sqrt(E Z²/N) and a
mean of N squared errors sqrt((E Z⁴ - (E Z²)²)/N). Tests allow 5 standard errors
(a false failure about once in 1.7 million runs per assertion).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from guard_fixtures import BLOCKS, truth
from sekisho.guard.cells import Bounding, cells_sql
from sekisho.guard.protect import dp
from sekisho.guard.protection import DPProtection, declared_row_identity

Z = 5.0   # standard errors allowed


@pytest.fixture(scope="module")
def inst(own_city):
    """A copy of the city of this module's own (``guard`` in conftest.py follows ``inst``):
    many runs of one query need a budget large enough for them (the ledger is tested
    elsewhere), a change of the policy."""
    text = own_city.policy_path.read_text(encoding="utf-8")
    own_city.policy_path.write_text(re.sub(r"(?m)^(\s+budget_per_period:).*$", r"\1 100000.0", text),
                                    encoding="utf-8")
    return own_city


def moments(epsilon: float, sensitivity: int) -> tuple[float, float]:
    """(E Z², E Z⁴) of ``dp.discrete_laplace(·, epsilon, sensitivity)``."""
    num, den = dp._ratio(epsilon, sensitivity)
    a = math.exp(-num / den)
    return 2 * a / (1 - a) ** 2, 2 * a * (1 + 10 * a + a * a) / (1 - a) ** 4


def assert_mse(errors: np.ndarray, m2: float, m4: float) -> None:
    n = errors.size
    mse = float(np.mean(errors.astype(float) ** 2))
    se = math.sqrt((m4 - m2 * m2) / n)
    assert abs(mse - m2) <= Z * se, (mse, m2, se, n)


def assert_unbiased(errors: np.ndarray, m2: float) -> None:
    n = errors.size
    assert abs(float(np.mean(errors))) <= Z * math.sqrt(m2 / n), (float(np.mean(errors)), m2, n)


def released(guard, sql: str, epsilon: float, user: str = "ana") -> dict:
    table = guard.query(sql, user=user, mode="dp", epsilon=epsilon).table
    names = table.column_names
    return {tuple(r[c] for c in names[:-1]): r[names[-1]] for r in table.to_pylist()}


# ---- the sampler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon, sensitivity", [(1.0, 1), (0.1, 1), (0.5, 3), (0.25, 12)])
def test_discrete_laplace_has_its_distribution(epsilon, sensitivity):
    n = 100_000
    z = dp.discrete_laplace(n, epsilon, sensitivity)
    assert z.dtype == np.int64
    m2, m4 = moments(epsilon, sensitivity)
    assert_unbiased(z, m2)
    assert_mse(z, m2, m4)
    num, den = dp._ratio(epsilon, sensitivity)
    a = math.exp(-num / den)
    for value in range(-3, 4):   # the probability of each small value, binomial standard error
        p = (1 - a) / (1 + a) * a ** abs(value)
        assert abs(float(np.mean(z == value)) - p) <= Z * math.sqrt(p * (1 - p) / n), value


def test_epsilon_is_rounded_down_by_at_most_two_to_the_minus_20():
    for eps in (1.0, 0.1, 1 / 3, 0.001, 1e-6, 7.5):
        spent = dp.effective_epsilon(eps)
        assert eps * (1 - 2 ** -20) <= spent <= eps


def test_the_exact_integer_path_for_tiny_epsilon_has_its_distribution():
    # a denominator beyond int64 arrays is sampled with Python integers, same algorithm
    num, den = dp._ratio(1e-13, 2 ** 21)
    assert den >= dp._VECTOR_LIMIT
    assert len(dp.discrete_laplace(2, 1e-13, 2 ** 21)) == 2
    z = np.array([dp._discrete_laplace_scalar(*dp._ratio(0.5, 1)) for _ in range(20_000)])
    m2, m4 = moments(0.5, 1)
    assert_unbiased(z, m2)
    assert_mse(z, m2, m4)


# ---- partition selection ---------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon, delta, groups", [(1.0, 1e-6, 1), (0.1, 1e-6, 1), (0.05, 1e-6, 1),
                                                    (0.5, 1e-5, 12), (0.01, 1e-9, 2)])
def test_partition_threshold_bounds_delta_and_is_the_smallest_that_does(epsilon, delta, groups):
    t = dp.partition_threshold(epsilon, delta, groups)
    num, den = dp._ratio(epsilon, groups)
    a = math.exp(-num / den)
    # a cell whose only contributor is one person (n = 1) passes n + Z >= T with
    # probability P(Z >= T - 1) = α^(T-1)/(1+α); a person is in at most ``groups`` cells
    assert groups * a ** (t - 1) / (1 + a) <= delta
    assert groups * a ** (t - 2) / (1 + a) > delta * (1 - 1e-6)


def test_non_public_keys_release_the_count_their_selection_compared(guard, inst):
    """chome_code has no public domain: a chome is shown when its noisy person count
    reaches T, and COUNT(*) on the person-unique view is that very count (one draw, all
    of ε): every released value is >= T, and only chomes that exist are released."""
    eps = 1.0
    t = dp.partition_threshold(eps, guard.policy.disclosure.dp.delta, 1)
    true = dict(truth(inst, "SELECT chome_code, COUNT(*) FROM residents GROUP BY 1"))
    got = released(guard, "SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY 1", eps)
    assert got and all(n >= t for n in got.values())
    assert {k[0] for k in got} <= set(true)
    assert "2820149999" not in {k[0] for k in got}   # the planted chome of one person
    # with ε on one draw, the threshold is 1 + ln(1/2δ)/ε-ish, not the 60/12-person bounds
    assert t <= 1 + math.log(1 / (2 * guard.policy.disclosure.dp.delta)) / dp.effective_epsilon(eps) + 2


# ---- counts: the error the mechanism's parameters predict ----------------------------------------

def test_block_counts_have_the_error_of_sensitivity_one(guard, inst):
    """residents is declared ``record_key: person``: one row and one group per person, so
    a count by block (public domain: no selection, one aggregate) is the true count plus
    discrete Laplace noise of sensitivity 1 and all of ε — RMSE sqrt(2α)/(1-α) ≈ 1.36 at
    ε = 1, not the policy-wide 60 rows per person (RMSE ≈ 82 before issue 18)."""
    eps, runs = 1.0, 60
    sql = "SELECT block, COUNT(*) AS n FROM residents GROUP BY block"
    true = dict(truth(inst, "SELECT block, COUNT(*) FROM residents GROUP BY block"))
    errors = []
    for _ in range(runs):
        got = released(guard, sql, eps)
        assert set(k[0] for k in got) == set(BLOCKS)
        errors += [got[(b,)] - true.get(b, 0) for b in BLOCKS]
    errors = np.array(errors)
    m2, m4 = moments(eps, 1)
    assert_unbiased(errors, m2)
    assert_mse(errors, m2, m4)
    assert math.sqrt(float(np.mean(errors.astype(float) ** 2))) <= 1.6


def test_small_counts_are_unbiased_and_may_be_negative(guard, inst):
    """Cells of block x age band x sex (public domains: densified, empty cells included)
    with a true count of 0, 1 or 2: the mean of many noisy releases is the true count
    within the standard error the noise scale gives. Clipping at 0 (before issue 18)
    added E[max(0, c + Z)] - c > 0 to each of them."""
    eps, runs = 0.5, 25
    sql = "SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2, 3"
    true = {tuple(r[:3]): r[3] for r in truth(inst, "SELECT block, age_band, sex, COUNT(*) FROM residents "
                                                    "GROUP BY 1, 2, 3")}
    errors = []
    for _ in range(runs):
        got = released(guard, sql, eps)
        errors += [n - true.get(key, 0) for key, n in got.items() if true.get(key, 0) <= 2]
    errors = np.array(errors)
    assert errors.size >= 1000
    m2, m4 = moments(eps, 1)
    assert_unbiased(errors, m2)
    assert_mse(errors, m2, m4)
    assert (errors < 0).any()   # noisy counts of empty cells below 0 are released as drawn


# ---- sums ----------------------------------------------------------------------------------------

TAX_SUM = "SELECT block, SUM(income_levy) AS s FROM resident_tax WHERE tax_year = 2025 GROUP BY block"


def test_sums_with_the_year_fixed_have_the_error_of_one_row_per_person(guard, inst):
    """resident_tax is declared ``record_key: {record: tax_year}``: with the year fixed each
    person has one row, so the sum's sensitivity is the measure's bound (2e7 yen), not
    60 rows x 2e7. The fixed-point unit is 16 yen: the answer is the clamped sum plus
    discrete Laplace noise on that grid, and nothing is rounded to billions (Snapping
    rounded to multiples of ~2.4e9 yen before issue 18)."""
    eps, runs = 1.0, 40
    lo, hi = guard.policy.views["resident_tax"].columns["income_levy"].bounds
    true = dict(truth(inst, f"SELECT block, SUM(LEAST(GREATEST(CAST(income_levy AS DOUBLE), {lo}), {hi})) "
                            "FROM resident_tax "
                            "WHERE tax_year = 2025 GROUP BY block"))
    sensitivity = max(abs(lo), abs(hi))
    unit = dp.fixed_point_unit(sensitivity)
    assert unit == 16.0
    units = math.ceil(sensitivity / unit) + 1
    errors, values = [], []
    for _ in range(runs):
        got = released(guard, TAX_SUM, eps)
        for (b,), s in got.items():
            assert s / unit == round(s / unit)          # on the fixed-point grid ...
            values.append(s)
            errors.append((s - round(true.get(b, 0) / unit) * unit) / unit)
    # ... and only on it: answers are not multiples of a coarse power of two
    assert len({round(v / unit) % 2 ** 16 for v in values}) > len(values) // 2
    errors = np.array(errors)
    m2, m4 = moments(eps, units)
    assert_unbiased(errors, m2)
    assert_mse(errors, m2, m4)


def test_fixed_point_sum_unit_and_sensitivity():
    for sens in (1.0, 1000.0, 2e7, 1.2e9, 0.37):
        unit = dp.fixed_point_unit(sens)
        assert math.log2(unit) == int(math.log2(unit))
        assert 2 ** 20 <= sens / unit < 2 ** 21
    out = dp._fixed_point_sum(np.array([0.0, 123456789.0, -5e8]), 1.0, 2e7)
    assert all(v / 16 == round(v / 16) for v in out)


# ---- bounds from the policy's declarations and the query text --------------------------------------

@pytest.mark.parametrize("sql, identity", [
    ("SELECT block, COUNT(*) FROM residents GROUP BY block", ("person_id",)),
    (TAX_SUM, ("person_id", "tax_year")),
    ("SELECT t.block, SUM(t.income_levy) FROM resident_tax AS t WHERE 2025 = t.tax_year AND t.sex = '男' "
     "GROUP BY 1", ("person_id", "tax_year")),
    ("SELECT block, COUNT(*) FROM resident_tax WHERE tax_year IN (2025) GROUP BY block", ("person_id", "tax_year")),
    ("SELECT block, SUM(income_levy) FROM (SELECT * FROM resident_tax WHERE tax_year = 2025) GROUP BY block",
     ("person_id", "tax_year")),
    ("SELECT block, SUM(income_levy) FROM resident_tax GROUP BY block", None),
    ("SELECT block, SUM(income_levy) FROM resident_tax WHERE tax_year >= 2025 GROUP BY block", None),
    ("SELECT block, SUM(income_levy) FROM resident_tax WHERE tax_year IN (2024, 2025) GROUP BY block", None),
    ("SELECT block, SUM(income_levy) FROM resident_tax WHERE tax_year = 2025 OR sex = '男' GROUP BY block", None),
    ("SELECT block, COUNT(*) FROM movements GROUP BY block", None),
    ("SELECT m.idou_type, COUNT(*) FROM movements m JOIN facilities f ON m.block = f.block GROUP BY 1", None),
])
def test_contribution_bounds_come_from_the_declarations_and_the_query(guard, sql, identity):
    snap = guard.snapshots.current()
    catalog = guard._catalog("analyst", snap)
    plan = guard.plans.plan(sql, user="ana", role="analyst", snapshot=snap.id, catalog=catalog)
    assert declared_row_identity(guard.policy, plan.boundaries[0]) == identity


def test_the_store_only_chooses_the_sql_never_the_bound(guard, inst, monkeypatch):
    """If the snapshot did not confirm one row per (person, tax_year), the declared bound
    would be enforced by the cells SQL (one row per person kept) instead of trusted: the
    noise parameters are the same either way, and on conforming data so are the cells."""
    import sekisho.guard.protection as protection
    from types import SimpleNamespace

    snap = guard.snapshots.current()
    catalog = guard._catalog("analyst", snap)
    plan = guard.plans.plan(TAX_SUM, user="ana", role="analyst", snapshot=snap.id, catalog=catalog)
    bp = plan.boundaries[0]
    clamp = {0: bp.aggregates[0].bounds}
    ctx = SimpleNamespace(policy=guard.policy, snap=snap, catalog=catalog, deadline=None)
    fast, bounding, params = DPProtection._bounds(ctx, bp, clamp, 1.0)
    assert fast and (params.max_rows, params.max_groups) == (1, 1)
    monkeypatch.setattr(protection, "unique_in_store", lambda *a, **k: False)
    slow, bounding2, params2 = DPProtection._bounds(ctx, bp, clamp, 1.0)
    assert not slow and params2 == params and bounding2 == bounding == Bounding(1, 1, clamp)

    def cells(person_unique):
        rows = snap.cursor().execute(cells_sql(bp, person_unique=person_unique, bounding=bounding,
                                               dominance=False)).fetchall()
        return sorted((r[0], r[1]) for r in rows)   # (block, persons)
    assert cells(True) == cells(False)


def test_multi_year_sums_keep_the_policy_bounds(guard):
    snap = guard.snapshots.current()
    catalog = guard._catalog("analyst", snap)
    plan = guard.plans.plan("SELECT block, SUM(income_levy) FROM resident_tax GROUP BY block", user="ana",
                            role="analyst", snapshot=snap.id, catalog=catalog)
    bp = plan.boundaries[0]
    from types import SimpleNamespace
    ctx = SimpleNamespace(policy=guard.policy, snap=snap, catalog=catalog, deadline=None)
    _, bounding, params = DPProtection._bounds(ctx, bp, {0: bp.aggregates[0].bounds}, 1.0)
    d = guard.policy.disclosure.dp
    assert (params.max_rows, params.max_groups) == (d.max_rows_per_person, d.max_groups_per_person)
    assert (bounding.max_rows, bounding.max_groups) == (d.max_rows_per_person, d.max_groups_per_person)
