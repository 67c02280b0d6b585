"""Report building blocks that need no data: catalogue, periods, mesh geometry, page checks."""

from __future__ import annotations

import json
import math

import jismesh.utils as ju
import nbformat
import numpy as np
import pandas as pd
import pytest

from sekisho.reports import catalog
from sekisho.reports.html import external_loads, page
from sekisho.reports.mesh import cell_grid, mesh_figure
from sekisho.reports.periods import add_months, months_between, year_windows
from sekisho.reports.render import PROTECTION_NOTE, Report, format_cell, table_html
from sekisho.reports.sql import resident_at


# ---- catalogue ---------------------------------------------------------------------

def test_the_catalogue_covers_items_1_to_41_once():
    numbers = [n for nb in catalog.notebooks() for n, _ in nb.items]
    assert sorted(numbers) == list(range(1, 42))
    headings = {n: h for nb in catalog.notebooks() for n, h in nb.items}
    assert headings[1] == "人口状況" and headings[5] == "人口メッシュ地図 250m"
    assert headings[36] == "世帯構成毎の世帯件数の推移（5年間）"
    assert headings[37] == "教育・保育施設利用状況【概要】"
    assert headings[38] == "認定区分・世帯所得階層・地域ブロック別の児童数"


def test_every_notebook_has_a_papermill_parameters_cell():
    for nb in catalog.notebooks():
        cells = nbformat.read(nb.path, as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, nb.name
        for name in ("base_month", "compare_month", "period", "area_level"):
            assert f"{name} =" in tagged[0].source, (nb.name, name)


def test_notebooks_reach_data_only_through_the_guard_helper():
    """No notebook opens the store, DuckDB, the raw exports or the Guard itself."""
    forbidden = ("duckdb", "sekisho.store", "Store(", ".csv", "Guard(", "read_parquet", "secret")
    for nb in catalog.notebooks():
        source = "\n".join(c.source for c in nbformat.read(nb.path, as_version=4).cells
                           if c.cell_type == "code")
        for word in forbidden:
            assert word not in source, (nb.name, word)


def test_select_by_name_or_number():
    assert [nb.name for nb in catalog.select(["01", "07_教育保育"])] == ["01_人口", "07_教育保育"]
    with pytest.raises(KeyError, match="available"):
        catalog.select(["99"])


# ---- periods and SQL fragments -------------------------------------------------------

def test_month_arithmetic():
    assert add_months("2026-10", -11) == "2025-11"
    assert add_months("2026-01", -1) == "2025-12"
    assert months_between("2025-11", "2026-02") == ["2025-11", "2025-12", "2026-01", "2026-02"]
    assert year_windows("2026-10", 2) == [("2024-11", "2025-10", "2024-11〜2025-10"),
                                          ("2025-11", "2026-10", "2025-11〜2026-10")]
    with pytest.raises(ValueError, match="YYYY-MM"):
        add_months("2026-13", 1)


def test_sql_fragments_reject_injection_through_months():
    with pytest.raises(ValueError, match="基準年月"):
        resident_at("2026-10' OR 1=1 --")


# ---- mesh geometry -------------------------------------------------------------------

@pytest.mark.parametrize("level,column", [(3, "mesh1km"), (4, "mesh500m"), (5, "mesh250m")])
def test_mesh_cells_sit_where_jismesh_puts_them(level, column):
    rng = np.random.default_rng(level)
    lat, lon = rng.uniform(34.78, 34.95, 400), rng.uniform(134.55, 134.75, 400)
    codes = pd.Series(ju.to_meshcode(lat, lon, level)).astype(str).drop_duplicates()
    grid = cell_grid(codes, level)
    centre_lat, centre_lon = ju.to_meshpoint(codes.astype("int64").to_numpy(), 0.5, 0.5)
    assert np.allclose(grid.lat, centre_lat) and np.allclose(grid.lon, centre_lon)
    # every centre maps back to its own code: the grid drawn is the JIS X 0410 grid
    assert list(ju.to_meshcode(grid.lat.to_numpy(), grid.lon.to_numpy(), level).astype(str)) == list(codes)

    values = pd.DataFrame({column: codes.to_numpy(), "n": np.arange(len(codes), dtype=float)})
    values.loc[0, "n"] = np.nan  # suppressed by the guard
    fig = mesh_figure(values, column, "n", title="t", value_label="人口")
    hidden, shown = fig.data
    r0, c0 = grid.row.iloc[0], grid.col.iloc[0]
    assert hidden.z[r0][c0] == 1 and math.isnan(shown.z[r0][c0])
    r1, c1 = grid.row.iloc[1], grid.col.iloc[1]
    assert shown.z[r1][c1] == 1.0 and math.isnan(hidden.z[r1][c1])
    assert np.isclose(shown.x[c1], grid.lon.iloc[1]) and np.isclose(shown.y[r1], grid.lat.iloc[1])


def test_a_map_of_a_single_cell():
    fig = mesh_figure(pd.DataFrame({"mesh1km": ["52346250"], "n": [12.0]}), "mesh1km", "n",
                      title="t", value_label="人口", diverging=True)
    assert fig.data[1].z[0][0] == 12.0


def test_mesh_codes_of_the_wrong_level_are_named():
    with pytest.raises(ValueError, match="52346250"):
        cell_grid(pd.Series(["52346250"]), 5)


# ---- rendering -----------------------------------------------------------------------

def test_tables_show_suppressed_cells_as_hidden_and_are_saved(tmp_path):
    r = Report(tables_dir=str(tmp_path), base_month="2026-10")
    df = pd.DataFrame({"区分": ["男", "女"], "人口": [1234.0, np.nan], "率": ["定員なし", 95.5]})
    r.table("item99", "99. テスト", df)
    saved = json.loads((tmp_path / "item99.json").read_text(encoding="utf-8"))
    assert saved["rows"] == [["男", 1234.0, "定員なし"], ["女", None, 95.5]]
    assert saved["parameters"] == {"base_month": "2026-10"} and PROTECTION_NOTE in saved["notes"]
    assert (tmp_path / "item99.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    html = table_html(df)
    assert "1,234" in html and "秘匿" in html
    assert format_cell(np.int64(5)) == "5"


def test_page_embeds_plotly_once_and_loads_nothing():
    import plotly.graph_objects as go

    figs = "".join(go.Figure(go.Bar(x=[1], y=[2])).to_html(full_html=False, include_plotlyjs=False)
                   for _ in range(3))
    html = page(title="人口", meta=[("基準年月", "2026年10月")], body=figs)
    assert html.count("<!-- plotly.js (embedded) -->") == 1
    assert html.count("Plotly.newPlot") >= 3
    assert external_loads(html) == []


@pytest.mark.parametrize("snippet", [
    '<script src="https://cdn.plot.ly/plotly.min.js"></script>',
    "<script src='//cdnjs.cloudflare.com/require.js'></script>",
    '<link rel="stylesheet" href="http://fonts.googleapis.com/css">',
    "<style>@import url(https://fonts.googleapis.com/css);</style>",
    '<div style="background: url(https://x/y.png)"></div>',
    '<img src="https://tile.openstreetmap.org/1/1/1.png">',
])
def test_external_loads_are_detected(snippet):
    html = page(title="t", meta=[], body=snippet)
    assert external_loads(html)


def test_analysts_can_copy_the_notebooks(tmp_path):
    copied = catalog.copy_notebooks(tmp_path)
    assert sorted(p.name for p in copied) == sorted(nb.path.name for nb in catalog.notebooks())
    (tmp_path / "01_人口.ipynb").write_text("mine")
    assert catalog.copy_notebooks(tmp_path) == []           # an analyst's edits are kept
    assert (tmp_path / "01_人口.ipynb").read_text() == "mine"
