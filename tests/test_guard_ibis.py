"""ibis expressions compiled with ``ibis.to_sql(expr, dialect="duckdb")`` pass through the
guard unchanged — on the real pipeline (synth -> ingest -> store)."""

from __future__ import annotations

import ibis
import pytest

from guard_fixtures import build_real_city, ibis_table, truth
from sekisho.guard import Guard, QueryRefused


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    return build_real_city(tmp_path_factory.mktemp("guard-ibis-src"))


@pytest.fixture(scope="module")
def guard(city):
    g = Guard(city.instance)
    yield g
    g.close()


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
def test_ibis_idiom_passes_unchanged(guard, city, name):
    expr = idioms(tables(guard, city.analyst))[name]
    sql = ibis.to_sql(expr, dialect="duckdb")
    result = guard.query(sql, user=city.analyst)
    assert result.table.column_names == list(expr.schema().names)
    assert guard.describe(sql, user=city.analyst).names == list(expr.schema().names)


def test_ibis_counts_match_truth_within_perturbation(guard, city):
    t = tables(guard, city.analyst)
    r = t["residents"]
    sql = ibis.to_sql(r.group_by("block").agg(n=r.count()), dialect="duckdb")
    got = {row["block"]: row["n"] for row in guard.query(sql, user=city.analyst).table.to_pylist()}
    true = dict(truth(city.instance, "SELECT block, COUNT(*) FROM residents GROUP BY 1"))
    for block, n in got.items():
        if true.get(block, 0) >= 10:
            assert abs(n - true[block]) <= 2
        else:
            assert n is None


@pytest.mark.parametrize("build", [
    lambda t: t["residents"].limit(5),
    lambda t: t["residents"].select("block").distinct(),
    lambda t: (lambda x: x.aggregate(n=x.count()))(t["residents"].filter(t["residents"].person_id == "x")),
    lambda t: t["resident_tax"].aggregate(m=t["resident_tax"].taxable_income.max()),
])
def test_ibis_row_level_and_unsafe_idioms_are_refused(guard, city, build):
    sql = ibis.to_sql(build(tables(guard, city.analyst)), dialect="duckdb")
    with pytest.raises(QueryRefused):
        guard.query(sql, user=city.analyst)
