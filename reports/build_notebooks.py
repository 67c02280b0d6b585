"""Write the report notebooks (``reports/*.ipynb``) from the cell sources below.

The notebooks are the artefacts analysts open and papermill executes; this script keeps
their common structure (title, ``parameters`` cell, set-up) identical. Edit here, then run
``python reports/build_notebooks.py``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
# パラメータ（papermill の parameters セル）
base_month = None        # 基準年月 YYYY-MM（None: データの最新月）
compare_month = None     # 比較年月 YYYY-MM（None: 基準年月の12か月前）
period = 5               # 期間（年、1〜5）
area_level = "地域ブロック"  # 地域区分: 地域ブロック / 町丁目 / mesh
tables_dir = None        # 表（JSON/CSV）の保存先（公開時に設定）'''

SETUP = '''\
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sekisho.reference import AGE_BANDS, BLOCKS, CERT_TYPES, FACILITY_TYPES, IDOU_TYPES, PREFECTURES
from sekisho.reports import data
from sekisho.reports.mesh import mesh_figure
from sekisho.reports.notebook import lookup, order_by, scalar, start, wide
from sekisho.reports.periods import add_months, label_ja, months_between
from sekisho.reports.sql import (FAMILY_TYPES, age_band_at, households_at, in_childcare_at, lit, moved_between,
                                 resident_at)

ctx = start(base_month=base_month, compare_month=compare_month, period=period,
            area_level=area_level, tables_dir=tables_dir)
R, q = ctx.report, data.sql
BASE, COMPARE, AREA = ctx.base_month, ctx.compare_month, ctx.area_column
YEAR = moved_between(ctx.year_first, BASE)   # the 12 months ending at 基準年月
R.note(ctx.caption())'''

COMMON_INTRO = ("データはすべて関所のガード（閾値モード、識別子 `reports`）を通して取得しています。"
                "少数のセルは秘匿され、その他の値には一貫した撹乱が加えられています。")


def notebook(name: str, title: str, intro: str, items: list[tuple[str, str, str]]) -> None:
    cells = [new_markdown_cell(f"# {title}\n\n{intro}\n\n{COMMON_INTRO}")]
    params = new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    cells += [params, new_code_cell(SETUP)]
    for heading, description, code in items:
        cells.append(new_markdown_cell(f"## {heading}\n\n{description}"))
        cells.append(new_code_cell(code.strip("\n")))
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
        "sekisho": {"title": title},
    })
    nbformat.write(nb, HERE / f"{name}.ipynb")


# ---------------------------------------------------------------- 01 人口 ----------
POPULATION = [
    ("1. 人口状況", "基準年月末と比較年月末の人口・世帯数、および地域ブロック別の人口。", '''
def population(month):
    where = resident_at(month)
    by_sex = q(f"SELECT sex, COUNT(*) AS n FROM residents WHERE {where} GROUP BY sex")
    total = q(f"SELECT COUNT(*) AS n FROM residents WHERE {where}")
    households = q(f"SELECT COUNT(DISTINCT household_id) AS n FROM residents WHERE {where}")
    return {"総人口": scalar(total), "男": lookup(by_sex, {"sex": "男"}),
            "女": lookup(by_sex, {"sex": "女"}), "世帯数": scalar(households)}

now, before = population(BASE), population(COMPARE)
summary = pd.DataFrame({"区分": list(now), label_ja(BASE): list(now.values()),
                        label_ja(COMPARE): list(before.values())})
summary["増減"] = summary[label_ja(BASE)] - summary[label_ja(COMPARE)]
summary["増減率(%)"] = (summary["増減"] / summary[label_ja(COMPARE)] * 100).round(2)
R.table("item01", "1. 人口状況", summary)

by_block = q(f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY block, sex")
block_total = q(f"SELECT block, COUNT(*) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY block")
block_hh = q(f"SELECT block, COUNT(DISTINCT household_id) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY block")
t = wide(by_block, "block", "sex", "n", index_order=BLOCKS, column_order=["男", "女"])
t["計"] = t["block"].map(block_total.set_index("block")["n"])
t["世帯数"] = t["block"].map(block_hh.set_index("block")["n"])
t = t.rename(columns={"block": "地域ブロック"})
R.table("item01_block", "1. 人口状況（地域ブロック別）", t)
R.figure(px.bar(by_block.rename(columns={"block": "地域ブロック", "sex": "性別", "n": "人口"}),
                x="地域ブロック", y="人口", color="性別", barmode="stack",
                category_orders={"地域ブロック": list(BLOCKS)}, title="地域ブロック別人口（基準年月末）"))
'''),
    ("2. 人口詳細", "地域区分（パラメータ area_level）ごとの男女別人口。", '''
col = "chome_name" if AREA == "chome_name" else AREA
detail = q(f"SELECT {col} AS area, sex, COUNT(*) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY {col}, sex")
totals = q(f"SELECT {col} AS area, COUNT(*) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY {col}")
t = wide(detail, "area", "sex", "n", column_order=["男", "女"],
         index_order=BLOCKS if AREA == "block" else sorted(detail["area"].dropna().unique()))
t["計"] = t["area"].map(totals.set_index("area")["n"])
t = t.rename(columns={"area": ctx.area_label})
R.table("item02", "2. 人口詳細", t)
'''),
] + [
    (f"{n}. 人口メッシュ地図 {size}", f"基準年月末の人口を{size}メッシュ（JIS X 0410）で表示します。色のないメッシュは、住民がいないか、少数のため秘匿されたメッシュです（区別できないように表示しません）。", f'''
mesh = q(f"SELECT {col} AS mesh, COUNT(*) AS n FROM residents WHERE {{resident_at(BASE)}} GROUP BY {col}")
R.figure(mesh_figure(mesh.rename(columns={{"mesh": "{col}"}}), "{col}", "n",
                     title="人口メッシュ地図 {size}", value_label="人口"))
t = mesh.sort_values("n", ascending=False, na_position="last").rename(columns={{"mesh": "メッシュコード", "n": "人口"}})
R.table("item{n:02d}", "{n}. 人口メッシュ地図 {size}", t)
''') for n, size, col in ((3, "1km", "mesh1km"), (4, "500m", "mesh500m"), (5, "250m", "mesh250m"))
] + [
    ("6. 年齢階層別表", "基準年月末の5歳階級（e-Stat）別・男女別人口（年齢は基準年月末時点）。市全体と地域ブロック別。", '''
# age at the end of the base month, computed row by row from the birth month
AGED = f"(SELECT sex, block, {age_band_at(BASE)} AS age_band FROM residents WHERE {resident_at(BASE)}) AS r"
ages = q(f"SELECT age_band, sex, COUNT(*) AS n FROM {AGED} GROUP BY age_band, sex")
age_total = q(f"SELECT age_band, COUNT(*) AS n FROM {AGED} GROUP BY age_band")
t = wide(ages, "age_band", "sex", "n", index_order=AGE_BANDS, column_order=["男", "女"])
t["計"] = t["age_band"].map(age_total.set_index("age_band")["n"])
R.table("item06", "6. 年齢階層別表", t.rename(columns={"age_band": "年齢階級"}))
pyramid = go.Figure()
for sex, sign, color in (("男", -1, "#4a7ebb"), ("女", 1, "#d0607a")):
    part = order_by(ages[ages.sex == sex], "age_band", AGE_BANDS)
    pyramid.add_bar(y=part.age_band, x=sign * part.n, orientation="h", name=sex, marker_color=color,
                    customdata=part.n, hovertemplate="%{y}: %{customdata:,}人<extra>" + sex + "</extra>")
pyramid.update_layout(title="人口ピラミッド（基準年月末）", barmode="relative", height=620,
                      xaxis_title="人口（左: 男、右: 女）", yaxis_title="年齢階級",
                      yaxis=dict(categoryorder="array", categoryarray=list(AGE_BANDS)))
R.figure(pyramid)

by_block = q(f"SELECT block, age_band, sex, COUNT(*) AS n FROM {AGED} GROUP BY block, age_band, sex")
t = by_block.pivot_table(index=["block", "age_band"], columns="sex", values="n", aggfunc="first", dropna=False)
t = t.reindex(pd.MultiIndex.from_product([BLOCKS, AGE_BANDS], names=["block", "age_band"]))
t = t.reindex(columns=["男", "女"]).reset_index()
R.table("item06_block", "6. 年齢階層別表（地域ブロック別）",
        t.rename(columns={"block": "地域ブロック", "age_band": "年齢階級"}))
'''),
]

# ---------------------------------------------------------------- 02 異動 ----------
MOVES_SETUP = '''
# Balances (Himeji): 自然 = 出生 - 死亡; 社会 = 転入 - 転出 + その他(職権記載); 人口増減 = 自然 + 社会.
# Each side of a balance is asked of the guard as ONE cell (e.g. 社会増 = 転入 + 職権記載), so a
# small, suppressed 職権記載 count does not make the balance unknown.
FLOW = ("CASE WHEN idou_type IN ('転入', '職権記載') THEN '社会増' WHEN idou_type = '転出' THEN '社会減' "
        "WHEN idou_type = '出生' THEN '自然増' WHEN idou_type = '死亡' THEN '自然減' END")
FLOWS = ("社会増", "社会減", "自然増", "自然減")

def counts(where, by=()):
    # protected counts per 異動 type and per balance side, grouped by the columns `by`
    keys = "".join(f"{k}, " for k in by)
    types = q(f"SELECT {keys}idou_type, COUNT(*) AS n FROM movements WHERE {where} GROUP BY {keys}idou_type")
    flows = q(f"SELECT {keys}{FLOW} AS flow, COUNT(*) AS n FROM movements WHERE {where} GROUP BY {keys}flow")
    return types, flows

def row(types, flows, key=None):
    key = key or {}
    c = {t: lookup(types, {**key, "idou_type": t}) for t in IDOU_TYPES}
    f = {x: lookup(flows, {**key, "flow": x}) for x in FLOWS}
    natural, social = f["自然増"] - f["自然減"], f["社会増"] - f["社会減"]
    return {**c, "自然増減": natural, "社会増減": social, "人口増減": natural + social}

def monthly(where, first, last):
    # one row per calendar month of the window (public), so a month whose cells are all
    # suppressed — or a small city with none at all — shows 秘匿 instead of vanishing
    types, flows = counts(where, ("idou_ym",))
    return pd.DataFrame([{"年月": m, **row(types, flows, {"idou_ym": m})} for m in months_between(first, last)],
                        columns=["年月", *IDOU_TYPES, "自然増減", "社会増減", "人口増減"])

def balance_chart(df, title):
    fig = go.Figure()
    for col, color in (("自然増減", "#5b8e3e"), ("社会増減", "#4a7ebb")):
        fig.add_bar(x=df["年月"], y=df[col], name=col, marker_color=color)
    fig.add_scatter(x=df["年月"], y=df["人口増減"], name="人口増減", mode="lines+markers", line_color="#333")
    fig.update_layout(title=title, barmode="relative", xaxis_title="年月", yaxis_title="件数（人）")
    return fig

BALANCE_NOTE = ("人口増減 = 自然増減 + 社会増減、自然増減 = 出生 − 死亡、社会増減 = 転入 − 転出 + その他（職権記載）。"
                "増・減それぞれを1つの保護されたセルとして集計しています。")
'''

MOVES = [
    ("7. 異動状況", "基準年月までの12か月間の異動件数（住基の異動区分）と人口増減。", MOVES_SETUP + '''
by_sex = counts(YEAR, ("sex",))
total = counts(YEAR)
cols = {"計": row(*total), "男": row(*by_sex, {"sex": "男"}), "女": row(*by_sex, {"sex": "女"})}
items = list(IDOU_TYPES) + ["自然増減", "社会増減", "人口増減"]
R.table("item07", "7. 異動状況", pd.DataFrame([{"区分": i, **{c: cols[c][i] for c in cols}} for i in items]),
        note=BALANCE_NOTE)
R.figure(px.bar(x=list(IDOU_TYPES), y=[cols["計"][t] for t in IDOU_TYPES], labels={"x": "異動区分", "y": "件数"},
                title=f"異動区分別件数（{label_ja(ctx.year_first)}〜{label_ja(BASE)}）"))
'''),
    ("8. 異動詳細", "地域区分別・異動区分別の件数（基準年月までの12か月間）。地域は転入・出生・転居は異動後、転出・死亡は異動前の住所。", '''
types, flows = counts(YEAR, (AREA,))
areas = BLOCKS if AREA == "block" else sorted(set(types[AREA].dropna()) | set(flows[AREA].dropna()))
t = pd.DataFrame([{ctx.area_label: a, **row(types, flows, {AREA: a})} for a in areas])
R.table("item08", "8. 異動詳細", t, note=BALANCE_NOTE)
'''),
    ("9. 経年異動状況詳細", "期間内の各12か月間の異動区分別・男女別件数と増減。", '''
rows = []
for first, last, label in ctx.windows:
    types, flows = counts(moved_between(first, last), ("sex",))
    rows += [{"期間": label, "性別": sex, **row(types, flows, {"sex": sex})} for sex in ("男", "女")]
R.table("item09", "9. 経年異動状況詳細", pd.DataFrame(rows), note=BALANCE_NOTE)
'''),
    ("10. 経年異動状況詳細_異動件数", "期間内の各12か月間の異動区分別件数。", '''
yearly = pd.DataFrame([{"期間": label, **row(*counts(moved_between(first, last)))}
                       for first, last, label in ctx.windows])
R.table("item10", "10. 経年異動状況詳細_異動件数", yearly[["期間", *IDOU_TYPES]])
long = yearly.melt(id_vars="期間", value_vars=list(IDOU_TYPES), var_name="異動区分", value_name="件数")
R.figure(px.bar(long, x="期間", y="件数", color="異動区分", barmode="group", title="異動区分別件数の推移"))
'''),
    ("11. 経年異動状況詳細_増減件数", "期間内の各12か月間の自然増減・社会増減・人口増減。", '''
t = yearly[["期間", "自然増減", "社会増減", "人口増減"]]
R.table("item11", "11. 経年異動状況詳細_増減件数", t, note=BALANCE_NOTE)
R.figure(balance_chart(t.rename(columns={"期間": "年月"}), "人口増減の推移（12か月ごと）"))
'''),
    ("12. エリア地図異動状況詳細", "地域ブロック別の転入・転出・転居と、1kmメッシュ別の転入超過数（転入 − 転出）の地図（基準年月までの12か月間）。灰色は転入・転出の一方が秘匿されたメッシュです。", '''
inflow = q(f"SELECT block, idou_type, COUNT(*) AS n FROM movements WHERE {YEAR} GROUP BY block, idou_type")
moved_out = q(f"SELECT from_block AS block, COUNT(*) AS n FROM movements WHERE {YEAR} AND idou_type = '転居' GROUP BY from_block")
t = wide(inflow, "block", "idou_type", "n", column_order=["転入", "転出", "転居"], index_order=BLOCKS)
t = t.rename(columns={"転居": "転居（入）"})
t["転居（出）"] = t["block"].map(moved_out.set_index("block")["n"])
t["転入超過"] = t["転入"] - t["転出"]
t["転居増減"] = t["転居（入）"] - t["転居（出）"]
R.table("item12", "12. エリア地図異動状況詳細", t.rename(columns={"block": "地域ブロック"}))
mesh = q(f"SELECT mesh1km, idou_type, COUNT(*) AS n FROM movements WHERE {YEAR} AND idou_type IN ('転入', '転出') GROUP BY mesh1km, idou_type")
net = wide(mesh, "mesh1km", "idou_type", "n", column_order=["転入", "転出"])
net["転入超過"] = net["転入"] - net["転出"]
R.figure(mesh_figure(net, "mesh1km", "転入超過", title="転入超過数（転入 − 転出）", value_label="転入超過", diverging=True))
'''),
    ("13. 経年異動状況詳細_月別増減件数", "基準年月までの12か月の月別の増減。", '''
t = monthly(YEAR, ctx.year_first, BASE)
R.table("item13", "13. 経年異動状況詳細_月別増減件数", t, note=BALANCE_NOTE)
R.figure(balance_chart(t, "月別人口増減"))
'''),
    ("14. 経年異動状況詳細_月別増減件数_女性", "同・女性。", '''
t = monthly(f"{YEAR} AND sex = '女'", ctx.year_first, BASE)
R.table("item14", "14. 経年異動状況詳細_月別増減件数_女性", t, note=BALANCE_NOTE)
R.figure(balance_chart(t, "月別人口増減（女性）"))
'''),
    ("15. 経年異動状況詳細_月別増減件数_男性", "同・男性。", '''
t = monthly(f"{YEAR} AND sex = '男'", ctx.year_first, BASE)
R.table("item15", "15. 経年異動状況詳細_月別増減件数_男性", t, note=BALANCE_NOTE)
R.figure(balance_chart(t, "月別人口増減（男性）"))
'''),
    ("16. 経年異動状況詳細_経年", "期間全体の月別の増減の推移。", '''
t = monthly(moved_between(ctx.period_first, BASE), ctx.period_first, BASE)
R.table("item16", "16. 経年異動状況詳細_経年", t, note=BALANCE_NOTE)
R.figure(balance_chart(t, f"月別人口増減の推移（{ctx.period}年間）"))
'''),
]


# ------------------------------------------------------- 03 転入 / 04 転出 ----------
def migration(kind: str, first: int) -> list[tuple[str, str, str]]:
    pref, muni, muni_name = (("from_pref_code", "from_muni_code", "from_muni_name") if kind == "転入"
                             else ("to_pref_code", "to_muni_code", "to_muni_name"))
    where = f"idou_type = '{kind}'"
    other = "転入元" if kind == "転入" else "転出先"
    here = "転入先" if kind == "転入" else "転出元"
    items = [
        (f"{kind}状況", f"基準年月までの12か月の月別・男女別{kind}者数。", f'''
monthly_sex = q(f"SELECT idou_ym, sex, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY idou_ym, sex")
monthly_total = q(f"SELECT idou_ym, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY idou_ym")
t = wide(monthly_sex, "idou_ym", "sex", "n", column_order=["男", "女"], index_order=months_between(ctx.year_first, BASE))
t["計"] = t["idou_ym"].map(monthly_total.set_index("idou_ym")["n"])
year_total = scalar(q(f"SELECT COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}}"))
t = pd.concat([t, pd.DataFrame([{{"idou_ym": "12か月計", "計": year_total}}])], ignore_index=True)
R.table("item{first:02d}", "{first}. {kind}状況", t.rename(columns={{"idou_ym": "年月"}}))
R.figure(px.bar(monthly_sex.rename(columns={{"idou_ym": "年月", "sex": "性別", "n": "{kind}者数"}}),
                x="年月", y="{kind}者数", color="性別", title="月別{kind}者数"))
'''),
        (f"{kind}状況都道府県", f"{other}の都道府県別{kind}者数（基準年月までの12か月）。", f'''
prefs = q(f"SELECT {pref} AS pref, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY {pref}")
prefs["都道府県"] = prefs["pref"].map(PREFECTURES)
t = prefs.sort_values("pref")[["pref", "都道府県", "n"]].rename(columns={{"pref": "コード", "n": "{kind}者数"}})
R.table("item{first + 1:02d}", "{first + 1}. {kind}状況都道府県", t)
R.figure(px.bar(t.dropna(subset=["{kind}者数"]), x="都道府県", y="{kind}者数", title="{other}都道府県別{kind}者数"))
'''),
        (f"{kind}状況詳細", f"{here}の地域区分別・男女別{kind}者数（基準年月までの12か月）。", f'''
detail = q(f"SELECT {{AREA}} AS area, sex, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY {{AREA}}, sex")
totals = q(f"SELECT {{AREA}} AS area, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY {{AREA}}")
t = wide(detail, "area", "sex", "n", column_order=["男", "女"], index_order=BLOCKS if AREA == "block" else None)
t["計"] = t["area"].map(totals.set_index("area")["n"])
R.table("item{first + 2:02d}", "{first + 2}. {kind}状況詳細", t.rename(columns={{"area": ctx.area_label}}))
'''),
        (f"{kind}状況経年", f"期間内の各12か月間の男女別{kind}者数。", f'''
rows = []
for first, last, label in ctx.windows:
    span = moved_between(first, last)
    sexes = q(f"SELECT sex, COUNT(*) AS n FROM movements WHERE {where} AND {{span}} GROUP BY sex")
    total = scalar(q(f"SELECT COUNT(*) AS n FROM movements WHERE {where} AND {{span}}"))
    rows.append({{"期間": label, "男": lookup(sexes, {{"sex": "男"}}), "女": lookup(sexes, {{"sex": "女"}}), "計": total}})
t = pd.DataFrame(rows)
R.table("item{first + 3:02d}", "{first + 3}. {kind}状況経年", t)
R.figure(px.line(t, x="期間", y=["計", "男", "女"], markers=True, title="{kind}者数の推移",
                 labels={{"value": "{kind}者数", "variable": "区分"}}))
'''),
        (f"{kind}状況詳細市区町村", f"{other}の市区町村別{kind}者数（基準年月までの12か月、多い順）。", f'''
munis = q(f"SELECT {pref} AS pref, {muni} AS muni, {muni_name} AS name, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY {pref}, {muni}, {muni_name}")
munis["都道府県"] = munis["pref"].map(PREFECTURES)
t = munis.sort_values("n", ascending=False, na_position="last")[["muni", "都道府県", "name", "n"]]
R.table("item{first + 4:02d}", "{first + 4}. {kind}状況詳細市区町村",
        t.rename(columns={{"muni": "市区町村コード", "name": "市区町村", "n": "{kind}者数"}}))
'''),
    ]
    if kind == "転入":
        items.append((f"{kind}状況都道府県年齢階級", f"{other}都道府県別・年齢階級別{kind}者数（基準年月までの12か月）。", f'''
cross = q(f"SELECT {pref} AS pref, age_band, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY {pref}, age_band")
t = wide(cross, "pref", "age_band", "n", column_order=AGE_BANDS)
t.insert(1, "都道府県", t["pref"].map(PREFECTURES))
R.table("item{first + 5:02d}", "{first + 5}. {kind}状況都道府県年齢階級", t.rename(columns={{"pref": "コード"}}))
'''))
    n_age = first + (6 if kind == "転入" else 5)
    items.append((f"{kind}状況年齢階級", f"年齢階級別・男女別{kind}者数（基準年月までの12か月、年齢は異動時）。", f'''
ages = q(f"SELECT age_band, sex, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY age_band, sex")
totals = q(f"SELECT age_band, COUNT(*) AS n FROM movements WHERE {where} AND {{YEAR}} GROUP BY age_band")
t = wide(ages, "age_band", "sex", "n", index_order=AGE_BANDS, column_order=["男", "女"])
t["計"] = t["age_band"].map(totals.set_index("age_band")["n"])
R.table("item{n_age:02d}", "{n_age}. {kind}状況年齢階級", t.rename(columns={{"age_band": "年齢階級"}}))
R.figure(px.bar(ages.rename(columns={{"age_band": "年齢階級", "sex": "性別", "n": "{kind}者数"}}),
                x="年齢階級", y="{kind}者数", color="性別", barmode="group",
                category_orders={{"年齢階級": list(AGE_BANDS)}}, title="年齢階級別{kind}者数"))
'''))
    return [(f"{first + i}. {h}", d, c) for i, (h, d, c) in enumerate(items)]


# ---------------------------------------------------------------- 05 転居 ----------
RELOCATION = [
    ("30. 転居（入）状況", "市内転居の転居先地域ブロック別・男女別件数（基準年月までの12か月）。", '''
inflow = q(f"SELECT block, sex, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY block, sex")
totals = q(f"SELECT block, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY block")
t = wide(inflow, "block", "sex", "n", index_order=BLOCKS, column_order=["男", "女"])
t["計"] = t["block"].map(totals.set_index("block")["n"])
R.table("item30", "30. 転居（入）状況", t.rename(columns={"block": "転居先地域ブロック"}))
R.figure(px.bar(inflow.rename(columns={"block": "地域ブロック", "sex": "性別", "n": "転居（入）件数"}),
                x="地域ブロック", y="転居（入）件数", color="性別", category_orders={"地域ブロック": list(BLOCKS)},
                title="地域ブロック別転居（入）件数"))
'''),
    ("31. 転居（出）状況", "市内転居の転居元地域ブロック別・男女別件数（基準年月までの12か月）。", '''
outflow = q(f"SELECT from_block AS block, sex, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY from_block, sex")
totals = q(f"SELECT from_block AS block, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY from_block")
t = wide(outflow, "block", "sex", "n", index_order=BLOCKS, column_order=["男", "女"])
t["計"] = t["block"].map(totals.set_index("block")["n"])
R.table("item31", "31. 転居（出）状況", t.rename(columns={"block": "転居元地域ブロック"}))
flows = q(f"SELECT from_block, block, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY from_block, block")
matrix = wide(flows, "from_block", "block", "n", index_order=BLOCKS, column_order=BLOCKS)
R.figure(go.Figure(go.Heatmap(z=matrix[list(BLOCKS)].to_numpy(dtype=float), x=list(BLOCKS), y=matrix["from_block"],
                              colorscale="Blues", colorbar=dict(title="件数"),
                              hovertemplate="%{y} → %{x}: %{z:,}件<extra></extra>"))
         .update_layout(title="地域ブロック間の転居（転居元 → 転居先、空白は秘匿）",
                        xaxis_title="転居先", yaxis_title="転居元", height=560))
'''),
    ("32. 転居（入）詳細", "転居先の地域区分別・男女別件数（基準年月までの12か月）。", '''
detail = q(f"SELECT {AREA} AS area, sex, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY {AREA}, sex")
totals = q(f"SELECT {AREA} AS area, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY {AREA}")
t = wide(detail, "area", "sex", "n", column_order=["男", "女"], index_order=BLOCKS if AREA == "block" else None)
t["計"] = t["area"].map(totals.set_index("area")["n"])
R.table("item32", "32. 転居（入）詳細", t.rename(columns={"area": "転居先" + ctx.area_label}))
'''),
    ("33. 転居（出）詳細", "転居元の地域区分別件数（基準年月までの12か月）。転居元は町丁目までしか記録されないため、地域区分が mesh の場合も町丁目で表示します。", '''
if AREA == "block":
    detail = q(f"SELECT from_block AS area, sex, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY from_block, sex")
    totals = q(f"SELECT from_block AS area, COUNT(*) AS n FROM movements WHERE idou_type = '転居' AND {YEAR} GROUP BY from_block")
    label = "転居元地域ブロック"
else:
    # the public 町丁目 table gives the names of the codes left
    join = "FROM movements m JOIN areas a ON a.chome_code = m.from_chome_code"
    detail = q(f"SELECT a.chome_name AS area, m.sex, COUNT(*) AS n {join} WHERE m.idou_type = '転居' AND {moved_between(ctx.year_first, BASE, 'm.idou_ym')} GROUP BY a.chome_name, m.sex")
    totals = q(f"SELECT a.chome_name AS area, COUNT(*) AS n {join} WHERE m.idou_type = '転居' AND {moved_between(ctx.year_first, BASE, 'm.idou_ym')} GROUP BY a.chome_name")
    label = "転居元町丁目"
t = wide(detail, "area", "sex", "n", column_order=["男", "女"], index_order=BLOCKS if AREA == "block" else None)
t["計"] = t["area"].map(totals.set_index("area")["n"])
R.table("item33", "33. 転居（出）詳細", t.rename(columns={"area": label}))
'''),
]

# ---------------------------------------------------------------- 06 世帯 ----------
HOUSEHOLDS_NOTE = ("家族類型は国勢調査の世帯の家族類型（単独・夫婦のみ・夫婦と子供・ひとり親と子供・三世代・その他）で、"
                   "各時点に住民である世帯員の続柄から世帯ごとに判定します（判定方法は docs/reports.md）。"
                   "世帯数は世帯を単位として保護され、10世帯未満の区分は秘匿しています。")
HOUSEHOLDS = [
    ("34. 基準年月時点の世帯状況",
     "基準年月末の世帯数・人口・平均世帯人員、家族類型別の世帯数、地域ブロック別・家族類型別の世帯数。" + HOUSEHOLDS_NOTE, '''
def ratio(a, b, digits=2):
    return round(a / b, digits) if pd.notna(a) and pd.notna(b) and b else float("nan")

def family_types(month):
    """Households by 家族類型 at the end of ``month`` and all households (unit counts)."""
    by_type = q(f"SELECT family_type, COUNT(*) AS n FROM {households_at(month)} AS h GROUP BY family_type")
    total = scalar(q(f"SELECT COUNT(*) AS n FROM {households_at(month)} AS h"))
    return {ft: lookup(by_type, {"family_type": ft}) for ft in FAMILY_TYPES}, total

now, now_households = family_types(BASE)
now_persons = scalar(q(f"SELECT COUNT(*) AS n FROM residents WHERE {resident_at(BASE)}"))
summary = pd.DataFrame({"区分": ["総世帯数", "総人口", "平均世帯人員"],
                        "値": [now_households, now_persons, ratio(now_persons, now_households)]})
R.table("item34", "34. 基準年月時点の世帯状況", summary)
t = pd.DataFrame({"家族類型": list(FAMILY_TYPES), "世帯数": [now[ft] for ft in FAMILY_TYPES]})
t["全世帯に占める割合(%)"] = [ratio(n * 100, now_households, 1) for n in t["世帯数"]]
R.table("item34_type", "34. 基準年月時点の世帯状況（家族類型別）", t)
R.figure(px.bar(t, x="家族類型", y="世帯数", title=f"家族類型別の世帯数（{label_ja(BASE)}末）"))

by_block = q(f"SELECT block, family_type, COUNT(*) AS n FROM {households_at(BASE)} AS h GROUP BY block, family_type")
block_households = q(f"SELECT block, COUNT(*) AS n FROM {households_at(BASE)} AS h GROUP BY block")
block_persons = q(f"SELECT block, COUNT(*) AS n FROM residents WHERE {resident_at(BASE)} GROUP BY block")
t = wide(by_block, "block", "family_type", "n", index_order=BLOCKS, column_order=list(FAMILY_TYPES))
t["総世帯数"] = [lookup(block_households, {"block": b}) for b in t["block"]]
t["人口"] = [lookup(block_persons, {"block": b}) for b in t["block"]]
t["平均世帯人員"] = [ratio(p, h) for p, h in zip(t["人口"], t["総世帯数"])]
total_row = {"block": "合計", **now, "総世帯数": now_households, "人口": now_persons,
             "平均世帯人員": ratio(now_persons, now_households)}
t = pd.concat([t, pd.DataFrame([total_row])], ignore_index=True)
R.table("item34_block", "34. 基準年月時点の世帯状況（地域ブロック別・家族類型別）", t.rename(columns={"block": "地域ブロック"}),
        note="地域ブロックは世帯の住所のブロックです。人口は同じ時点の住民数です。")
chart = by_block.dropna(subset=["n"])
R.figure(px.bar(chart, x="block", y="n", color="family_type", category_orders={"block": BLOCKS, "family_type": list(FAMILY_TYPES)},
                title=f"地域ブロック別・家族類型別の世帯数（{label_ja(BASE)}末）",
                labels={"block": "地域ブロック", "n": "世帯数", "family_type": "家族類型"}))
'''),
    ("35. 世帯構成毎の世帯件数の比較（2つの基準年月時点）", "比較年月末と基準年月末の家族類型別世帯数と総世帯数、その増減。", '''
before, before_households = family_types(COMPARE)
t = pd.DataFrame({"家族類型": list(FAMILY_TYPES) + ["総世帯数"],
                  label_ja(COMPARE): [before[ft] for ft in FAMILY_TYPES] + [before_households],
                  label_ja(BASE): [now[ft] for ft in FAMILY_TYPES] + [now_households]})
t["増減"] = t[label_ja(BASE)] - t[label_ja(COMPARE)]
R.table("item35", "35. 世帯構成毎の世帯件数の比較（2つの基準年月時点）", t)
chart = t[t["家族類型"] != "総世帯数"].melt(id_vars="家族類型", value_vars=[label_ja(COMPARE), label_ja(BASE)],
                                            var_name="時点", value_name="世帯数")
R.figure(px.bar(chart, x="家族類型", y="世帯数", color="時点", barmode="group", title="家族類型別の世帯数の比較"))
'''),
    ("36. 世帯構成毎の世帯件数の推移（5年間）", "基準年月から12か月ごとにさかのぼった各時点（期間の年数分）の家族類型別世帯数と総世帯数。", '''
points = [add_months(BASE, -12 * i) for i in reversed(range(ctx.period))]
rows = []
for m in points:
    types, households = (now, now_households) if m == BASE else family_types(m)
    rows.append({"時点": label_ja(m), **types, "総世帯数": households})
trend = pd.DataFrame(rows, columns=["時点", *FAMILY_TYPES, "総世帯数"])
R.table("item36", "36. 世帯構成毎の世帯件数の推移（5年間）", trend)
R.figure(px.line(trend, x="時点", y=list(FAMILY_TYPES), markers=True, title="家族類型別の世帯数の推移",
                 labels={"value": "世帯数", "variable": "家族類型"}))
'''),
]

# ------------------------------------------------------------ 07 教育・保育 ----------
CHILDCARE = [
    ("37. 教育・保育施設利用状況【概要】",
     "基準年月に施設を利用している児童数（支給認定区分 1号・2号・3号別）と定員、定員充足率（利用児童数 ÷ 定員、厚生労働省の定義）。"
     "定員が0の区分は「定員なし」と表示し、利用児童数は表示します。定員を超える行は強調表示します。", '''
def overview(group_col, capacity_col, order, label, key, title):
    cap = q(f"SELECT {capacity_col} AS grp, SUM(capacity_1) AS c1, SUM(capacity_2) AS c2, SUM(capacity_3) AS c3 FROM facilities GROUP BY {capacity_col}")
    cap_total = q("SELECT SUM(capacity_1) AS c1, SUM(capacity_2) AS c2, SUM(capacity_3) AS c3 FROM facilities")
    use = q(f"SELECT {group_col} AS grp, cert_type, COUNT(*) AS n FROM childcare WHERE {in_childcare_at(BASE)} GROUP BY {group_col}, cert_type")
    use_grp = q(f"SELECT {group_col} AS grp, COUNT(*) AS n FROM childcare WHERE {in_childcare_at(BASE)} GROUP BY {group_col}")
    use_cert = q(f"SELECT cert_type, COUNT(*) AS n FROM childcare WHERE {in_childcare_at(BASE)} GROUP BY cert_type")
    use_all = scalar(q(f"SELECT COUNT(*) AS n FROM childcare WHERE {in_childcare_at(BASE)}"))

    def ratio(children, capacity):
        if pd.isna(capacity) or capacity == 0:
            return "定員なし"
        return None if pd.isna(children) else round(children / capacity * 100, 1)

    rows, over = [], []
    for grp in list(order) + ["合計"]:
        row, flags = {label: grp}, []
        caps = cap_total.iloc[0] if grp == "合計" else cap.set_index("grp").reindex([grp]).iloc[0]
        for i, cert in enumerate(CERT_TYPES, start=1):
            capacity = caps[f"c{i}"]
            capacity = 0 if pd.isna(capacity) else int(capacity)
            children = (lookup(use_cert, {"cert_type": cert}) if grp == "合計"
                        else lookup(use, {"grp": grp, "cert_type": cert}))
            row |= {f"{cert}定員": capacity, f"{cert}利用児童数": children, f"{cert}充足率(%)": ratio(children, capacity)}
            if capacity > 0 and pd.notna(children) and children > capacity or capacity == 0 and pd.notna(children) and children > 0:
                flags.append(cert)
        capacity = sum(row[f"{c}定員"] for c in CERT_TYPES)
        children = use_all if grp == "合計" else lookup(use_grp, {"grp": grp})
        row |= {"計定員": capacity, "計利用児童数": children, "計充足率(%)": ratio(children, capacity)}
        if pd.notna(children) and children > capacity:
            flags.append("計")
        row["定員超過"] = "、".join(flags)
        rows.append(row)
        over.append(bool(flags))
    t = pd.DataFrame(rows)
    R.table(key, title, t, highlight=pd.Series(over),
            note="定員充足率 = 利用児童数 ÷ 定員 × 100。定員超過: 利用児童数が定員を超える区分（定員なしで利用がある区分を含む）。")
    return t

by_type = overview("facility_type", "facility_type", FACILITY_TYPES, "施設種別", "item37_type",
                   "37. 教育・保育施設利用状況【概要】（施設種別）")
by_block = overview("facility_block", "block", BLOCKS, "地域ブロック", "item37_block",
                    "37. 教育・保育施設利用状況【概要】（地域ブロック別）")
chart = by_block[by_block["地域ブロック"] != "合計"]
fig = go.Figure()
fig.add_bar(x=chart["地域ブロック"], y=chart["計定員"], name="定員", marker_color="#c9d6e8")
fig.add_bar(x=chart["地域ブロック"], y=chart["計利用児童数"], name="利用児童数", marker_color="#4a7ebb")
fig.update_layout(title="地域ブロック別 定員と利用児童数", barmode="group", xaxis_title="地域ブロック", yaxis_title="人数")
R.figure(fig)
'''),
]

NOTEBOOKS = [
    ("01_人口", "人口（人口状況・人口詳細・メッシュ地図・年齢階層）", "基準年月末の住民基本台帳人口。", POPULATION),
    ("02_異動", "異動（異動状況・経年異動・月別増減・エリア地図）", "住民基本台帳の異動（転入・転出・転居・出生・死亡・職権記載）。", MOVES),
    ("03_転入", "転入状況", "市外からの転入。", migration("転入", 17)),
    ("04_転出", "転出状況", "市外への転出。", migration("転出", 24)),
    ("05_転居", "転居状況", "市内での転居（転居元・転居先）。", RELOCATION),
    ("06_世帯", "世帯状況", "住民の世帯と家族類型（国勢調査の分類）から見た世帯の状況。", HOUSEHOLDS),
    ("07_教育保育", "教育・保育施設利用状況【概要】", "教育・保育施設の定員と利用児童数。", CHILDCARE),
]

if __name__ == "__main__":
    for name, title, intro, items in NOTEBOOKS:
        notebook(name, title, intro, items)
        print(f"wrote reports/{name}.ipynb ({len(items)} items)")
