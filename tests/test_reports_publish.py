"""Published reports against the truth: figures computed with pandas from the raw exports.

Every published cell must be the true figure within the guard's perturbation (±D from the
policy) when the cell has at least k contributing persons, and suppressed (``null``) when
it has fewer — exactly those cells, no more and no fewer.
"""

from __future__ import annotations

import hashlib
import json
import re

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

def test_all_41_items_are_published(published_city):
    html = ""
    for entry in published_city.index()["reports"].values():
        html += (published_city.instance.published_dir / entry["dir"] / "report.html").read_text(encoding="utf-8")
    numbers = {int(n) for n in re.findall(r"<h2[^>]*>\s*(\d+)\.\s", html)}
    assert numbers == set(range(1, 42))
    assert html.count("秘匿・撹乱処理のため合計が一致しない場合があります") >= 41


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
    # the session's instance is shared: analysts' tests query it after the publication,
    # so look at what the guard recorded up to the last publish entry
    last_publish = max(e["seq"] for e in published_city.instance.audit.entries(type="publish"))
    queries = [e for e in published_city.instance.audit.entries(type="query") if e["seq"] < last_publish]
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


def test_household_family_types_at_the_base_month(published_city, base_month, limits):
    """Items 34: households per 国勢調査 家族類型 (city and 地域ブロック) against pandas over
    the raw residents.csv; a cell is protected per household, so it is suppressed exactly
    when it has fewer than k households and otherwise within ±D."""
    households = ref.households_at(published_city.exports, base_month, published_city.extract)
    residents = ref.residents_at(published_city.exports, base_month, published_city.extract)
    summary, _ = published_city.table("item34")
    values = dict(zip(summary["区分"], summary["値"]))
    check_cell(values["総世帯数"], len(households), len(households), limits, "総世帯数")
    check_cell(values["総人口"], len(residents), len(residents), limits, "総人口")
    per_type = households.family_type.value_counts()
    by_type, _ = published_city.table("item34_type")
    assert list(by_type["家族類型"]) == list(ref.FAMILY_TYPES)
    for row in by_type.to_dict("records"):
        n = int(per_type.get(row["家族類型"], 0))
        check_cell(row["世帯数"], n, n, limits, f"{row['家族類型']} households")
    by_block, _ = published_city.table("item34_block")
    cells = households.groupby(["block", "family_type"]).size()
    per_block = households.groupby("block").size()
    suppressed = checked = 0
    for row in by_block.to_dict("records"):
        block = row["地域ブロック"]
        if block == "合計":
            continue
        for family_type in ref.FAMILY_TYPES:
            n = int(cells.get((block, family_type), 0))
            check_cell(row[family_type], n, n, limits, f"{block}/{family_type}")
            suppressed += row[family_type] is None
            checked += 1
        n = int(per_block.get(block, 0))
        check_cell(row["総世帯数"], n, n, limits, f"{block} households")
    assert checked == 13 * 6
    assert 0 < suppressed < checked, "the fixture city should have both small and large cells"


def test_household_family_types_compared_and_over_time(published_city, base_month, limits):
    """Items 35 and 36: the same classification at 比較年月, 基準年月 and yearly points."""
    compare = {e["parameters"]["compare_month"] for e in published_city.index()["reports"].values()}.pop()
    t35, _ = published_city.table("item35")
    for month in (compare, base_month):
        households = ref.households_at(published_city.exports, month, published_city.extract)
        per_type = households.family_type.value_counts()
        column = f"{int(month[:4])}年{int(month[5:])}月"
        for row in t35.to_dict("records"):
            n = len(households) if row["家族類型"] == "総世帯数" else int(per_type.get(row["家族類型"], 0))
            check_cell(row[column], n, n, limits, f"{month}/{row['家族類型']}")
    t36, _ = published_city.table("item36")
    assert len(t36) == 5
    for i, row in enumerate(t36.to_dict("records")):
        month = add_months(base_month, -12 * (4 - i))
        households = ref.households_at(published_city.exports, month, published_city.extract)
        per_type = households.family_type.value_counts()
        check_cell(row["総世帯数"], len(households), len(households), limits, f"{month} households")
        for family_type in ref.FAMILY_TYPES:
            n = int(per_type.get(family_type, 0))
            check_cell(row[family_type], n, n, limits, f"{month}/{family_type}")


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
    nb.cells.append(nbformat.v4.new_code_cell("query('SELECT person_id FROM residents')"))
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
