"""ibis expressions compiled with ``ibis.to_sql(expr, dialect="duckdb")`` pass through the
guard unchanged — on the real pipeline (synth -> ingest -> store)."""

from __future__ import annotations

import ibis
import pytest

from guard_fixtures import ibis_table, truth
from sekisho.guard import QueryRefused


@pytest.fixture(scope="module")
def inst(real_city):
    return real_city.instance   # ``guard`` (conftest.py) is a guard over it


def tables(guard, user):
    return {v: ibis_table(guard, user, v) for v in ("residents", "movements", "childcare", "resident_tax",
                                                  "facilities", "areas")}


def idioms(t):
    r, mv, c, tax, f = t["residents"], t["movements"], t["childcare"], t["resident_tax"], t["facilities"]
    out = {}
    out["group_by_agg"] = r.group_by(["block", "sex"]).agg(n=r.count())
    cur = r.filter(r.is_current)
    out["filter"] = cur.group_by("age_band").agg(n=cur.count())
    m = r.filter(r.age >= 0).mutate(band=ibis.cases((r.age < 15, "0-14"), (r.age < 65, "15-64"), else_="65+"))
    out["cases_banding"] = m.group_by("band").agg(n=m.count(), persons=m.person_id.nunique())
    by_block = r.group_by("block").agg(n=r.count())
    cap = f.group_by("block").agg(cap=f.capacity_1.sum() + f.capacity_2.sum() + f.capacity_3.sum())
    j = by_block.join(cap, "block")
    out["join_public_after_agg"] = j.mutate(per_seat=j.n / j.cap)
    jc = c.join(f, c.facility_id == f.facility_id)
    out["join_public_below_agg"] = jc.group_by(jc.facility_type_right).agg(children=jc.person_id.nunique())
    e = mv.group_by(["idou_type", "idou_year"]).agg(n=mv.count())
    out["order_limit"] = e.order_by([e.n.desc(), "idou_type", "idou_year"]).limit(5)
    s = r.group_by("block").agg(n=r.count())
    out["derived_share"] = s.mutate(share=s.n / s.n.sum())
    out["mean_of_measure"] = tax.group_by(["tax_year", "block"]).agg(
        m=tax.taxable_income.mean(), total=tax.income_levy.sum())
    sel = r.select("block", "sex")
    out["select_then_group"] = sel.group_by("block").agg(n=sel.count())
    out["whole_count"] = r.aggregate(n=r.count())
    out["public_only"] = f.order_by("facility_id").select("facility_id", "capacity_1")
    return out


@pytest.mark.parametrize("name", ["group_by_agg", "filter", "cases_banding", "join_public_after_agg",
                                  "join_public_below_agg", "order_limit", "derived_share", "mean_of_measure",
                                  "select_then_group", "whole_count", "public_only"])
def test_ibis_idiom_passes_unchanged(guard, real_city, name):
    expr = idioms(tables(guard, real_city.analyst))[name]
    sql = ibis.to_sql(expr, dialect="duckdb")
    result = guard.query(sql, user=real_city.analyst)
    assert result.table.column_names == list(expr.schema().names)
    assert guard.describe(sql, user=real_city.analyst).names == list(expr.schema().names)


def test_ibis_counts_match_truth_within_perturbation(guard, real_city):
    t = tables(guard, real_city.analyst)
    r = t["residents"]
    sql = ibis.to_sql(r.group_by("block").agg(n=r.count()), dialect="duckdb")
    got = {row["block"]: row["n"] for row in guard.query(sql, user=real_city.analyst).table.to_pylist()}
    true = dict(truth(real_city.instance, "SELECT block, COUNT(*) FROM residents GROUP BY 1"))
    for block, n in got.items():
        if true.get(block, 0) >= 10:
            assert abs(n - true[block]) <= guard.ptable.max_noise
        else:
            assert n is None


@pytest.mark.parametrize("build", [
    lambda t: t["residents"].limit(5),
    lambda t: t["residents"].select("block").distinct(),
    lambda t: (lambda x: x.aggregate(n=x.count()))(t["residents"].filter(t["residents"].person_id == "x")),
    lambda t: t["resident_tax"].aggregate(m=t["resident_tax"].taxable_income.max()),
])
def test_ibis_row_level_and_unsafe_idioms_are_refused(guard, real_city, build):
    sql = ibis.to_sql(build(tables(guard, real_city.analyst)), dialect="duckdb")
    with pytest.raises(QueryRefused):
        guard.query(sql, user=real_city.analyst)


# ---- the real pipeline: suppression is exactly "fewer than k distinct persons" -------------------
@pytest.mark.parametrize("sql, truth_sql", [
    ("SELECT block, age_band, sex, COUNT(*) AS n FROM residents WHERE is_current GROUP BY 1, 2, 3",
     "SELECT block, age_band, sex, COUNT(DISTINCT person_id) FROM residents WHERE is_current GROUP BY 1, 2, 3"),
    ("SELECT idou_type, idou_year, COUNT(*) AS n FROM movements GROUP BY 1, 2",
     "SELECT idou_type, idou_year, COUNT(DISTINCT person_id) FROM movements GROUP BY 1, 2"),
    ("SELECT cert_type, block, COUNT(DISTINCT person_id) AS n FROM childcare GROUP BY 1, 2",
     "SELECT cert_type, block, COUNT(DISTINCT person_id) FROM childcare GROUP BY 1, 2"),
])
def test_exactly_cells_below_k_suppressed_on_real_data(guard, real_city, sql, truth_sql):
    result = guard.query(sql, user=real_city.analyst)
    true = {tuple(r[:-1]): r[-1] for r in truth(real_city.instance, truth_sql)}
    rows = result.table.to_pylist()
    keys = [c for c in result.table.column_names if c != "n"]
    from sekisho.guard.protect import status
    from sekisho.protocol import cells_by_column

    companion = cells_by_column(result.cells)["n"]
    states, lows, highs = (companion[c].to_pylist() for c in ("status", "low", "high"))
    seen = set()
    for row, state, low, high in zip(rows, states, lows, highs):
        key = tuple(row[k] for k in keys)
        seen.add(key)
        persons = true.get(key, 0)
        if state == status.WIDENED:
            # answered without conditions that change the cell by fewer than k (maybe
            # none; cell_widening): released, whatever the persons of the cell asked for
            assert row["n"] is not None, (key, persons)
        elif persons < 10:
            assert row["n"] is None, (key, persons, row["n"])
        else:
            assert row["n"] is not None, (key, persons)
    # every group with >= k persons is released (none dropped)
    assert all(key in seen for key, persons in true.items() if persons >= 10)
    assert result.summary["cells_suppressed"] == sum(1 for r in rows if r["n"] is None)


def test_dp_budget_is_spent_even_if_the_answer_fails(guard, real_city, monkeypatch):
    import sekisho.guard.protection as protection

    before = guard.budget(real_city.analyst)["spent"]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the debit")
    monkeypatch.setattr(protection, "protect_dp", crash)
    with pytest.raises(QueryRefused) as info:   # an unexpected failure is an audited refusal
        guard.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user=real_city.analyst, mode="dp",
                    epsilon=0.5)
    assert info.value.code == "execution_failed" and "simulated" not in str(info.value)
    assert guard.budget(real_city.analyst)["spent"] == pytest.approx(before + 0.5)  # no refund
