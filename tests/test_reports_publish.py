"""Published reports against the truth: figures computed with pandas from the raw exports.

Every published cell must be the true figure within the guard's perturbation (±D from the
policy) when the cell has at least k contributing persons, and suppressed (``null``) when
it has fewer — exactly those cells, no more and no fewer.
"""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pytest

import reports_reference as ref
from sekisho.policy import load_policy
from sekisho.reports.html import external_loads
from sekisho.reports.periods import add_months, year_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limits(published_city):
    d = load_policy(published_city.instance.policy_path).disclosure
    return d.k, d.perturbation.max_noise


@pytest.fixture(scope="module")
def base_month(published_city):
    months = {e["base_month"] for e in published_city.index()["reports"].values()}
    assert len(months) == 1
    return months.pop()


def check_cell(published, true_value, contributors, limits, what):
    """One published cell against its true value and its number of contributing persons."""
    k, noise = limits
    if contributors < k:
        assert published is None, f"{what}: {contributors} persons < k={k} but published {published}"
    else:
        assert published is not None, f"{what}: {contributors} persons >= k but suppressed"
        assert abs(float(published) - true_value) <= noise, \
            f"{what}: published {published}, true {true_value} (allowed ±{noise})"


# ---- the publication itself ------------------------------------------------------------

def test_all_37_items_are_published(published_city):
    html = ""
    for entry in published_city.index()["reports"].values():
        html += (published_city.instance.published_dir / entry["dir"] / "report.html").read_text(encoding="utf-8")
    numbers = {int(n) for n in re.findall(r"<h2[^>]*>\s*(\d+)\.\s", html)}
    assert numbers == set(range(1, 38))
    assert html.count("秘匿・撹乱処理のため合計が一致しない場合があります") >= 37


def test_pages_are_self_contained(published_city):
    for name, entry in published_city.index()["reports"].items():
        page = (published_city.instance.published_dir / entry["dir"] / "report.html").read_text(encoding="utf-8")
        assert external_loads(page) == [], name
        assert page.count("<!-- plotly.js (embedded) -->") == 1, name
        # no input cells, no prompts: readers see outputs only
        assert "jp-InputArea" not in page and "input_area" not in page and "In&nbsp;[" not in page
        assert "SELECT " not in page.split("<!-- plotly.js (embedded) -->")[0]
        assert "Plotly.newPlot" in page, name


def test_each_publication_is_audited_with_digest_and_snapshot(published_city):
    entries = {e["details"]["report"]: e for e in published_city.instance.audit.entries(type="publish")
               if e["type"] == "publish"}
    index = published_city.index()["reports"]
    assert set(entries) == set(index)
    for name, entry in index.items():
        audit = entries[name]
        data = (published_city.instance.published_dir / entry["dir"] / "report.html").read_bytes()
        assert audit["details"]["digest"] == entry["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert audit["details"]["snapshot"] == entry["snapshot"]
        assert audit["details"]["parameters"]["base_month"] == entry["base_month"]
        assert audit["details"]["identity"] == "reports" and audit["outcome"] == "ok"


def test_every_query_went_through_the_guard_as_reports(published_city):
    queries = [e for e in published_city.instance.audit.entries(type="query")]
    assert queries and {e["user"] for e in queries} == {"reports"}
    assert {e["details"].get("mode", "threshold") for e in queries} == {"threshold"}


# ---- figures ---------------------------------------------------------------------------

def test_population_by_block_age_band_and_sex(published_city, base_month, limits):
    published, _ = published_city.table("item06_block")
    truth = ref.population_block_age_sex(published_city.exports, base_month, published_city.extract)
    checked = 0
    for row in published.itertuples(index=False):
        block, band, men, women = row
        for sex, value in (("男", men), ("女", women)):
            n = int(truth.get((block, band, sex), 0))
            check_cell(value, n, n, limits, f"{block}/{band}/{sex}")
            checked += 1
    assert checked == 13 * 21 * 2
    assert int(truth.sum()) > 0


def test_total_population_and_households(published_city, base_month, limits):
    published, _ = published_city.table("item01")
    residents = ref.residents_at(published_city.exports, base_month, published_city.extract)
    values = dict(zip(published["区分"], published[published.columns[1]]))
    check_cell(values["総人口"], len(residents), len(residents), limits, "総人口")
    check_cell(values["世帯数"], residents.setai_no.nunique(), len(residents), limits, "世帯数")
    for sex in ("男", "女"):
        n = int((residents.sex_ja == sex).sum())
        check_cell(values[sex], n, n, limits, sex)


def test_yearly_movement_totals(published_city, base_month, limits):
    published, _ = published_city.table("item10")
    windows = year_windows(base_month, 5)
    for row in published.to_dict("records"):
        first, last, label = next(w for w in windows if w[2] == row["期間"])
        moves = ref.movements_in(published_city.exports, first, last)
        for kind in ("転入", "転出", "転居", "出生", "死亡"):
            events = moves[moves.idou_type == kind]
            check_cell(row[kind], len(events), events.atena_no.nunique(), limits, f"{label}/{kind}")
    assert len(published) == 5


def test_household_counts_by_relationship(published_city, base_month, limits):
    summary, _ = published_city.table("item34")
    per_rel, _ = published_city.table("item34_relationship")
    total, truth = ref.households_by_relationship(published_city.exports, base_month, published_city.extract)
    residents = ref.residents_at(published_city.exports, base_month, published_city.extract)
    values = dict(zip(summary["区分"], summary["値"]))
    check_cell(values["総世帯数"], total, len(residents), limits, "総世帯数")
    for row in per_rel.to_dict("records"):
        rel = row["続柄"]
        households = int(truth.households.get(rel, 0))
        persons = int(truth.persons.get(rel, 0))
        check_cell(row["世帯数（該当世帯員のいる世帯）"], households, persons, limits, f"{rel} households")
        check_cell(row["人数"], persons, persons, limits, f"{rel} persons")


@pytest.mark.parametrize("key,group_col,fac_col,label", [
    ("item37_type", "facility_type", "facility_type", "施設種別"),
    ("item37_block", "block", "block", "地域ブロック"),
])
def test_childcare_overview(published_city, base_month, limits, key, group_col, fac_col, label):
    published, _ = published_city.table(key)
    facilities, in_use = ref.childcare_overview(published_city.exports, base_month)
    for row in published.to_dict("records"):
        group = row[label]
        fac = facilities if group == "合計" else facilities[facilities[fac_col] == group]
        kids = in_use if group == "合計" else in_use[in_use[group_col] == group]
        total_capacity = 0
        for i, cert in enumerate(("1号", "2号", "3号"), start=1):
            capacity = int(fac[f"capacity_{i}"].sum())
            total_capacity += capacity
            assert row[f"{cert}定員"] == capacity, (group, cert)  # public data: exact
            children = kids[kids.cert_type == cert]
            check_cell(row[f"{cert}利用児童数"], len(children), children.atena_no.nunique(), limits,
                       f"{group}/{cert}")
            ratio = row[f"{cert}充足率(%)"]
            if capacity == 0:
                assert ratio == "定員なし", (group, cert, ratio)
            elif row[f"{cert}利用児童数"] is not None:
                assert ratio == round(row[f"{cert}利用児童数"] / capacity * 100, 1)
        assert row["計定員"] == total_capacity
        check_cell(row["計利用児童数"], len(kids), kids.atena_no.nunique(), limits, f"{group}/計")
        over = [c for c in ("1号", "2号", "3号")
                if row[f"{c}利用児童数"] is not None and row[f"{c}利用児童数"] > row[f"{c}定員"]]
        assert all(c in row["定員超過"] for c in over), (group, row["定員超過"])


def test_a_failed_notebook_keeps_the_previous_publication(published_city, tmp_path, monkeypatch):
    """Publishing a broken notebook records publish.failed and leaves the index as it was."""
    import nbformat

    from sekisho.reports.catalog import notebooks
    from sekisho.reports.publish import publish

    instance = published_city.instance
    before = json.loads((instance.published_dir / "index.json").read_text(encoding="utf-8"))
    original = next(nb for nb in notebooks() if nb.name == "07_教育保育")
    nb = nbformat.read(original.path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("q('SELECT person_id FROM residents')"))
    broken_dir = tmp_path / "reports"
    broken_dir.mkdir()
    nbformat.write(nb, broken_dir / original.path.name)
    broken = [n for n in notebooks(broken_dir)]
    outcomes = publish(instance, broken, caller="pytest", caller_role=None, workers=1)
    assert [o.ok for o in outcomes] == [False]
    assert "row_level_output" in outcomes[0].error or "QueryRefused" in outcomes[0].error
    after = json.loads((instance.published_dir / "index.json").read_text(encoding="utf-8"))
    assert after == before
    failed = [e for e in instance.audit.entries(type="publish.failed") if e["type"] == "publish.failed"]
    assert failed and failed[-1]["details"]["report"] == "07_教育保育"
    leftovers = [p for p in (instance.published_dir / "07_教育保育").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def test_yearly_balances_follow_himejis_definitions(published_city, base_month, limits):
    """人口増減 = 自然 + 社会; 自然 = 出生 - 死亡; 社会 = 転入 - 転出 + その他(職権記載): each side
    is one protected cell, so each balance is within 2·D of the truth."""
    k, noise = limits
    published, _ = published_city.table("item11")
    for row in published.to_dict("records"):
        first, last, _ = next(w for w in year_windows(base_month, 5) if w[2] == row["期間"])
        n = ref.movements_in(published_city.exports, first, last).groupby("idou_type").size()
        natural = n.get("出生", 0) - n.get("死亡", 0)
        social = n.get("転入", 0) - n.get("転出", 0) + n.get("職権記載", 0)
        assert abs(row["自然増減"] - natural) <= 2 * noise, (row, natural)
        assert abs(row["社会増減"] - social) <= 2 * noise, (row, social)
        assert row["人口増減"] == row["自然増減"] + row["社会増減"]


def test_age_bands_are_those_at_the_base_month(published_city, tmp_path, monkeypatch, limits):
    """Run the population notebook for a base month a year before the extract (in-process,
    as the reports identity): ages are counted at the end of that month."""
    import papermill as pm

    from sekisho.reports.catalog import select

    monkeypatch.setenv("SEKISHO_HOME", str(published_city.instance.home))
    monkeypatch.setenv("SEKISHO_REPORTS_USER", "reports")
    month = add_months(published_city.extract.strftime("%Y-%m"), -12)
    pm.execute_notebook(str(select(["01"])[0].path), str(tmp_path / "run.ipynb"), kernel_name="python3",
                        parameters={"base_month": month, "tables_dir": str(tmp_path / "t")},
                        progress_bar=False, cwd=str(tmp_path))
    payload = json.loads((tmp_path / "t" / "item06_block.json").read_text(encoding="utf-8"))
    truth = ref.population_block_age_sex(published_city.exports, month, published_city.extract)
    for block, band, men, women in payload["rows"]:
        for sex, value in (("男", men), ("女", women)):
            n = int(truth.get((block, band, sex), 0))
            check_cell(value, n, n, limits, f"{month} {block}/{band}/{sex}")
