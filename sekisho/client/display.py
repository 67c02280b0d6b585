"""Results and refusals rendered for people (issue 19), in the Sekisho kernel.

* ``df.sekisho`` — a pandas accessor on every DataFrame the backend returns: ``status``,
  ``low``, ``high`` (DataFrames aligned with ``df``: one column per value column),
  ``summary``, ``cells``, ``to_html()``. ``to_pandas()`` / ``execute()`` still return
  plain values; status and accuracy live in ``df.attrs`` and are read through this
  accessor (``sekisho.client.status``: attaching them, and matching rows after
  ``head()``, ``sort_values()`` and filters).
* ``result_html(df)`` — a short Japanese header (方式, セル数, 秘匿, 撹乱 ±D or ε and 95%区間,
  conditions left out and why, ε used/remaining, 監査番号) over the table; 秘匿 cells are
  ``X`` (e-Stat), values the guard could not trace ``…``, absent values ``-``; numbers
  with thousands separators, never in scientific notation; a legend below.
* ``refusal_html(err)`` — what was refused, the offending part, a way forward
  (``sekisho.client.suggest``: a rewritten query where one exists) and the Python
  traceback folded away.
* ``install(shell)`` — registers both in an IPython shell (the Sekisho kernel calls it):
  an HTML formatter for DataFrames that carry a Sekisho summary, and a custom exception
  handler for ``GuardRefusal`` / ``GuardError``.
"""

from __future__ import annotations

import decimal
import html
import math
import re
import traceback
from typing import Any

import pandas as pd

from sekisho.client.status import SUMMARY_ATTR, ResultStatus, StatusUnavailable

MAX_ROWS = 200

SUPPRESSED = ("suppressed_k", "suppressed_dominance")
STATUS_JA = {"released": "公表", "suppressed_k": "秘匿（少人数）", "suppressed_dominance": "秘匿（優越性）",
             "partial": "秘匿セルを除いた集計", "widened": "一部の条件を外した集計"}
MODE_JA = {"threshold": "しきい値方式（最小人数・セルキー法による攪乱）", "dp": "差分プライバシー方式"}
ACCURACY_JA = {"cell_key": "セルキー法の攪乱", "sum_relative": "合計の攪乱（値に対する割合）",
               "dp_95": "95%区間", "none": "誤差幅の表示なし"}


# ---- df.sekisho ----------------------------------------------------------------------------

@pd.api.extensions.register_dataframe_accessor("sekisho")
class SekishoAccessor(ResultStatus):
    """``df.sekisho``: the disclosure summary and per-cell status/accuracy of a result
    (``status.ResultStatus``), and the result as HTML."""

    def to_html(self, max_rows: int = MAX_ROWS) -> str:
        return result_html(self._df, max_rows=max_rows)

    def _repr_html_(self) -> str:
        return self.to_html()


# ---- numbers -------------------------------------------------------------------------------

def format_number(value: Any, *, integer: bool = False) -> str:
    """Thousands separators, no scientific notation; integers as integers."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if integer or value == int(value) and abs(value) < 1e15:
            return f"{int(round(value)):,}"
        digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 100 else 2 if abs(value) >= 1 else 4
        return f"{value:,.{digits}f}"
    if isinstance(value, decimal.Decimal) and value.is_finite():
        # SQL sums of integers arrive as DECIMAL(38, 0)
        return format_number(int(value) if value == value.to_integral_value() else float(value), integer=integer)
    if hasattr(value, "item"):
        return format_number(value.item(), integer=integer)
    return str(value)


def _integral(series: pd.Series) -> bool:
    if pd.api.types.is_integer_dtype(series.dtype):
        return True
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.dropna()
        return bool(len(values)) and bool(((values % 1) == 0).all()) and bool((values.abs() < 1e15).all())
    return False


# ---- the header -----------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def header_lines(summary: dict[str, Any], accuracy: dict[str, str] | None = None,
                 half_widths: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, text) lines of the Japanese header, from the summary alone."""
    mode = summary.get("mode")
    lines = [("方式", MODE_JA.get(mode, str(mode)))]
    cells = summary.get("cells")
    if cells is not None:
        lines.append(("セル数", f"{format_number(cells)}（表の行数 {format_number(summary.get('rows', 0))}）"))
    suppressed = int(summary.get("cells_suppressed") or 0)
    dominance = int(summary.get("values_suppressed_dominance") or 0)
    if mode != "dp":
        parts = [f"少人数のセル {format_number(suppressed)}"]
        if dominance:
            parts.append(f"優越性ルールによる値 {format_number(dominance)}")
        lines.append(("秘匿", "、".join(parts) + "（表では X）"))
    acc = summary.get("accuracy") or {}
    if mode == "dp":
        eps = summary.get("epsilon_spent")
        text = f"ε = {eps:g}" if isinstance(eps, (int, float)) else "ε"
        text += "。各値に 95% 区間を付けています"
        if half_widths:
            text += "（" + "、".join(f"{k}: {v}" for k, v in half_widths.items()) + "）"
        lines.append(("撹乱", text))
        remaining = summary.get("epsilon_remaining")
        used = f"{eps:g}" if isinstance(eps, (int, float)) else "?"
        rest = f"{remaining:g}" if isinstance(remaining, (int, float)) else "?"
        lines.append(("ε（今回/残り）", f"{used} / {rest}"))
    elif summary.get("perturbation"):
        d = acc.get("count_max_noise", (summary.get("perturbation") or {}).get("max_noise"))
        text = f"件数 ±{d} 以内（セルキー法：同じ対象者には同じ攪乱）"
        rel = acc.get("sum_relative") or {}
        kinds = set((accuracy or acc.get("columns") or {}).values())
        if "sum_relative" in kinds and rel:
            text += f"、合計 ±{rel.get('sensitive', 0) * 100:.1f}% 以内（所得等）/ ±{rel.get('other', 0) * 100:.1f}% 以内"
        if "none" in kinds:
            text += "、平均や計算した値は誤差幅の表示なし"
        lines.append(("撹乱", text))
    left = summary.get("conditions_left_out_as") or [{"condition": c} for c in summary.get("conditions_left_out") or []]
    if left:
        lines.append(("適用しなかった条件", "、".join(
            f"{e['condition']}" + {"TRUE": "（常に成り立つものとして集計）", "FALSE": "（成り立たないものとして集計）"}
            .get(e.get("as"), "") for e in left) + "（対象者を最小人数以上変えないため。差分による個人の特定を防ぎます）"))
    if summary.get("query_id") is not None:
        lines.append(("監査番号", str(summary["query_id"])))
    return lines


def _half_widths(df: pd.DataFrame) -> dict[str, str]:
    """Per DP value column, the half-width of its 95% interval when it is one number."""
    out = {}
    try:
        low, high = df.sekisho.low, df.sekisho.high
    except (StatusUnavailable, KeyError, ValueError):
        return out
    for name in low.columns:
        widths = ((high[name] - low[name]) / 2).dropna().round(6).unique()
        if len(widths) == 1:
            out[str(name)] = "±" + format_number(float(widths[0]))
    return out


# ---- the table ------------------------------------------------------------------------------

def result_html(df: pd.DataFrame, *, max_rows: int = MAX_ROWS) -> str:
    summary = df.attrs.get(SUMMARY_ATTR) or {}
    try:
        status = df.sekisho.status
    except StatusUnavailable:
        status = pd.DataFrame(index=df.index)
    accuracy = df.sekisho.accuracy
    half = _half_widths(df) if summary.get("mode") == "dp" else {}
    head = "".join(f"<tr><th>{_esc(label)}</th><td>{_esc(text)}</td></tr>"
                   for label, text in header_lines(summary, accuracy, half))
    notes = "".join(f"<li>{_esc(n)}</li>" for n in summary.get("notes_ja") or [])
    shown = df.head(max_rows)
    integral = {c: _integral(df[c]) for c in df.columns}
    body, marks = [], set()
    for label, row in shown.iterrows():
        cells = []
        for c in df.columns:
            value = row[c]
            st = status.at[label, c] if c in status.columns and label in status.index else None
            if st in SUPPRESSED:
                marks.add("X")
                cells.append(f'<td class="sekisho-x" title="{_esc(STATUS_JA[st])}">X</td>')
                continue
            missing = value is None or (isinstance(value, float) and math.isnan(value)) or \
                (not isinstance(value, (list, tuple, dict)) and pd.isna(value) is True)
            if missing:
                # "-": released as no value; "…": no status known for it (maybe withheld)
                mark = "-" if st == "released" else "…"
                marks.add(mark)
                cells.append(f'<td class="sekisho-na">{mark}</td>')
            elif isinstance(value, (int, float, decimal.Decimal)) or hasattr(value, "item") and not isinstance(value, str):
                partial = "※" if st == "partial" else "†" if st == "widened" else ""
                marks.add(partial)
                cells.append(f'<td class="num">{_esc(format_number(value, integer=integral[c]))}{partial}</td>')
            else:
                cells.append(f"<td>{_esc(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = ""
    if len(df) > max_rows:
        more = f'<p class="sekisho-more">（先頭 {max_rows:,} 行を表示。全 {len(df):,} 行）</p>'
    columns = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    legend = ["X: 秘匿（少人数のセル、または少数の者が大部分を占める値）"]
    if "-" in marks:
        legend.append("-: 値なし（該当する値がない）")
    if "※" in marks:
        legend.append("※: 秘匿したセルを除いて集計した値（実際の値とは異なります）")
    if "†" in marks:
        legend.append("†: このセルで対象者を少ししか変えない条件を外して集計した値（誤差幅は広げています）")
    if "…" in marks:
        legend.append("…: 値がありません（集計後の加工のため状態が分からない値。秘匿の可能性があります）")
    return (
        '<div class="sekisho-result">'
        f'<table class="sekisho-header">{head}</table>'
        f'<table class="sekisho-table"><thead><tr>{columns}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f"{more}"
        f'<p class="sekisho-legend">{_esc("　".join(legend))}</p>'
        + (f'<ul class="sekisho-notes">{notes}</ul>' if notes else "")
        + "<p class=\"sekisho-help\">値の状態・誤差幅: df.sekisho.status / df.sekisho.low / df.sekisho.high</p>"
        + "</div>" + STYLE)


STYLE = """<style>
.sekisho-result table { border-collapse: collapse; margin: 4px 0; }
.sekisho-result th, .sekisho-result td { border: 1px solid #ccc; padding: 2px 8px; }
.sekisho-header th { text-align: left; background: #f3f3f3; font-weight: normal; }
.sekisho-result .sekisho-header td { text-align: left; }
.sekisho-table td.num, .sekisho-table td.sekisho-x, .sekisho-table td.sekisho-na { text-align: right; }
.sekisho-table td.sekisho-x { color: #a00; font-weight: bold; }
.sekisho-legend, .sekisho-help, .sekisho-more { font-size: 90%; color: #444; margin: 2px 0; }
.sekisho-refusal { border: 1px solid #d9a; background: #fff6f6; padding: 8px 12px; }
.sekisho-refusal pre { white-space: pre-wrap; background: #fff; padding: 4px; }
</style>"""


# ---- refusals -------------------------------------------------------------------------------

def _reason_ja(reason: str) -> str:
    return reason.split(" / ")[0] if reason else ""


def refusal_html(err: BaseException, *, views: dict[str, Any] | None = None,
                 budget: dict[str, Any] | None = None, tb_text: str | None = None) -> str:
    """The refusal as a short Japanese panel with a way forward; the traceback folded."""
    from sekisho.client.suggest import suggest

    code = getattr(err, "code", None) or type(err).__name__
    reason = getattr(err, "reason", None) or str(err)
    part = getattr(err, "part", None)
    refused = getattr(err, "sql", None)
    title = "関所は照会を受け付けませんでした" if hasattr(err, "reason") else "関所に照会できませんでした"
    rows = [f"<p><b>{_esc(title)}</b>（{_esc(code)}）</p>", f"<p>理由: {_esc(_reason_ja(reason))}</p>"]
    if part:
        rows.append(f"<p>問題の箇所: <code>{_esc(part)}</code></p>")
    suggestion = suggest(err, views or getattr(err, "views", None), budget) if hasattr(err, "reason") else None
    if suggestion is not None:
        rows.append(f"<p>代わりに: {_esc(suggestion.text)}</p>")
        call = suggestion.call()
        if call:
            rows.append(f'<pre class="sekisho-rewrite">{_esc(call)}</pre>')
    if refused:
        rows.append(f"<details><summary>送った SQL</summary><pre>{_esc(refused)}</pre></details>")
    if tb_text:
        rows.append(f"<details><summary>詳細（Python のトレースバック）</summary><pre>{_esc(tb_text)}</pre></details>")
    return f'<div class="sekisho-refusal">{"".join(rows)}</div>{STYLE}'


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def install(shell: Any, con: Any = None) -> None:
    """Register the result formatter and the refusal panel in an IPython ``shell``."""
    from sekisho.client.transport import GuardError, GuardRefusal

    formatter = shell.display_formatter.formatters["text/html"]
    previous = formatter.lookup_by_type(pd.DataFrame) if pd.DataFrame in formatter.type_printers else None

    def dataframe_html(df: pd.DataFrame) -> str | None:
        if df.attrs.get(SUMMARY_ATTR) is not None:
            return result_html(df)
        if previous is not None:
            return previous(df)
        return df._repr_html_()

    formatter.for_type(pd.DataFrame, dataframe_html)

    def handler(self: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
        from IPython.display import HTML, display

        tb_text = _ANSI.sub("", "".join(traceback.format_exception(etype, value, tb)))
        views = budget = None
        if con is not None:
            views = getattr(con, "views", None)
            if getattr(value, "code", None) in ("epsilon_invalid",):
                try:
                    budget = con.budget()
                except Exception:
                    budget = None
        display(HTML(refusal_html(value, views=views, budget=budget, tb_text=tb_text)))
        return []

    shell.set_custom_exc((GuardRefusal, GuardError), handler)
