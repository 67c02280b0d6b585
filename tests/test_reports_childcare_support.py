"""The 子育て支援 notebook (reports/08_子育て支援.ipynb, issue 18 item 5) as published at a
small city, against figures computed straight from the raw exports: every cell the true
figure within the guard's perturbation (±D read from the policy) when at least k persons
contribute, suppressed when fewer. The notebook also runs as an analyst in
``test_reports_as_analyst.py`` (parametrised over the catalogue)."""

from __future__ import annotations

import pandas as pd
import pytest

import reports_reference as ref
from sekisho.policy import load_policy
from sekisho.reference import CERT_TYPES
from sekisho.reports.periods import add_months

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(published_city):
    policy = load_policy(published_city.instance.policy_path)
    months = {e["base_month"] for e in published_city.index()["reports"].values()}
    assert len(months) == 1
    exports = published_city.exports
    residents = ref.read(exports, "residents.csv")
    tax = ref.read(exports, "resident_tax.csv").merge(residents[["atena_no", "setai_no"]], on="atena_no")
    tax["income_levy"] = tax.income_levy.astype(int)
    household = tax.groupby(["setai_no", tax.tax_year.astype(int)]).income_levy.sum().to_dict()
    return {"policy": policy, "month": months.pop(), "scheme": policy.bands["levy_class"],
            "household": household, "setai": dict(zip(residents.atena_no, residents.setai_no))}


def classify(scheme, value):
    if value is None or pd.isna(value):
        return scheme.missing
    return next(c.label for c in scheme.classes if value >= c.lo and (c.hi is None or value < c.hi))


def check(published, rows, persons, policy, what):
    k, noise = policy.disclosure.k, policy.disclosure.perturbation.max_noise
    if persons < k:
        assert published is None or pd.isna(published), f"{what}: {persons} persons < k={k}, published {published}"
    else:
        assert published is not None and not pd.isna(published), f"{what}: {persons} persons >= k, suppressed"
        assert abs(float(published) - rows) <= noise, f"{what}: published {published}, true {rows} (±{noise})"


def test_children_by_certification_and_household_band(published_city, setting):
    month, scheme, extract = setting["month"], setting["scheme"], published_city.extract
    fee_year = extract.year if extract.month >= 9 else extract.year - 1
    certs = ref.read(published_city.exports, "childcare_certifications.csv")
    valid = certs[(ref.ym(certs.valid_from) <= month) & (ref.ym(certs.valid_to) >= month)].copy()
    valid["band"] = [classify(scheme, setting["household"].get((setting["setai"][a], fee_year)))
                     for a in valid.atena_no]
    published, _ = published_city.table("item38")
    table = published.set_index("認定区分")
    checked = 0
    for cert in CERT_TYPES:
        for band in scheme.labels:
            cell = valid[(valid.cert_type == cert) & (valid.band == band)]
            check(table.loc[cert, band], len(cell), cell.atena_no.nunique(), setting["policy"], f"{cert}/{band}")
            checked += 1
        cell = valid[valid.cert_type == cert]
        check(table.loc[cert, "計"], len(cell), cell.atena_no.nunique(), setting["policy"], f"{cert}/計")
    assert checked == 3 * len(scheme.labels)
    assert list(table.columns) == [*scheme.labels, "計"]        # the policy's order of bands
    assert valid.band.nunique() >= 4


def test_young_leavers_by_household_band(published_city, setting):
    month, scheme = setting["month"], setting["scheme"]
    moves = ref.movements_in(published_city.exports, add_months(month, -11), month)
    residents = ref.read(published_city.exports, "residents.csv").set_index("atena_no")
    moves = moves[moves.idou_type == "転出"].copy()
    birth = pd.to_datetime(moves.atena_no.map(residents.birth_date))
    on = pd.to_datetime(moves.idou_date)
    before_birthday = (on.dt.month * 100 + on.dt.day) < (birth.dt.month * 100 + birth.dt.day)
    moves = moves[(on.dt.year - birth.dt.year - before_birthday.astype(int)) < 6]
    moves["band"] = [classify(scheme, setting["household"].get((s, int(d[:4]))))
                     for s, d in zip(moves.setai_no, moves.idou_date)]
    published, _ = published_city.table("item40")
    total = published[published["コード"] == "計"].iloc[0]
    for band in scheme.labels:
        if band in total.index:
            cell = moves[moves.band == band]
            check(total[band], len(cell), cell.atena_no.nunique(), setting["policy"], f"転出/{band}")
    check(total["計"], len(moves), moves.atena_no.nunique(), setting["policy"], "転出/計")
    assert len(moves) > 0


def test_the_map_and_tables_are_published(published_city):
    entry = published_city.index()["reports"]["08_子育て支援"]
    assert {"item38", "item38_block", "item39", "item40", "item41"} <= set(entry["tables"])
    page = (published_city.instance.published_dir / entry["dir"] / "report.html").read_text(encoding="utf-8")
    assert "0〜5歳人口と教育・保育施設の定員" in page and "Plotly.newPlot" in page
    occupancy, _ = published_city.table("item41")
    assert len(occupancy) == 13 and occupancy["定員"].astype(float).sum() > 0
