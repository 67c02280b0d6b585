"""What a report notebook shows: titled sections, protected tables, plotly figures.

The same notebook runs in two places:

* publishing (``sekisho reports publish`` sets ``SEKISHO_REPORTS_PUBLISH=1``): figures are
  emitted as plain HTML ``<div>`` + ``<script>`` (plotly's default renderer would emit only
  a JSON mimetype, which nbconvert drops); the page wrapper embeds plotly.js once. Each
  table is also saved as JSON and CSV beside the page so tests and analysts can read the
  exact published figures.
* an analyst's kernel: figures use plotly's normal renderer, tables display inline and are
  saved only if the analyst passes ``tables_dir``.
"""

from __future__ import annotations

import decimal
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

PROTECTION_NOTE = ("※ 秘匿・撹乱処理のため合計が一致しない場合があります。"
                   "「X」は秘匿（少数のため、または少数の者が大部分を占めるため表示していない値）です。")
SUPPRESSED = "X"          # e-Stat: 秘匿
SUPPRESSED_TITLE = "秘匿"
# the statuses of sekisho.protocol's cells table, as the CSV files name them
RELEASED, SUPPRESSED_K = "released", "suppressed_k"
STATUS_SUFFIX, ACCURACY_SUFFIX = "_status", "_accuracy"


def perturbation_note(perturbation: dict | None) -> str | None:
    """One sentence on the size of the perturbation, from the guard's summary."""
    if not perturbation:
        return None
    if perturbation.get("method") == "cell-key" and perturbation.get("max_noise") is not None:
        d = int(perturbation["max_noise"])
        return (f"※ 件数には、個人を特定されないよう、セルキー法による小さな攪乱を加えています"
                f"（保護済みの件数 1 つあたり ±{d} 以内。同じ対象者には常に同じ攪乱）。"
                f"増減など複数の件数から計算した値では、それぞれの攪乱が重なります。")
    if perturbation.get("method") == "dp":
        return "※ 値には差分プライバシーのノイズを加えています。"
    return None
NO_DATA = "データなし（該当がないか、少数のためすべて秘匿されています）。"
FONT = "Noto Sans CJK JP, Noto Sans JP, IPAexGothic, Meiryo, sans-serif"


def publishing() -> bool:
    return os.environ.get("SEKISHO_REPORTS_PUBLISH") == "1"


def _display(obj) -> None:
    from IPython.display import display

    display(obj)


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, decimal.Decimal):  # SQL sums of integers arrive as DECIMAL(38, 0)
        return None if not value.is_finite() else int(value) if value == value.to_integral_value() else float(value)
    return value


def format_cell(value: Any) -> str:
    """Counts with thousands separators, ratios as given, missing as X (秘匿)."""
    value = _jsonable(value)
    if value is None:
        return SUPPRESSED
    if isinstance(value, bool):
        return "○" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.1f}"
    return str(value)


def table_html(df: pd.DataFrame, highlight: pd.Series | None = None) -> str:
    """A plain HTML table (no pandas styler: no CSS classes we do not ship)."""
    from html import escape

    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, (_, row) in enumerate(df.iterrows()):
        css = ' class="over"' if highlight is not None and bool(highlight.iloc[i]) else ""
        cells = "".join(
            f'<td class="num sup" title="{SUPPRESSED_TITLE}">{SUPPRESSED}</td>' if _jsonable(v) is None else
            f'<td class="{"num" if isinstance(_jsonable(v), (int, float)) else "txt"}">'
            f"{escape(format_cell(v))}</td>" for v in row)
        rows.append(f"<tr{css}>{cells}</tr>")
    return (f'<div class="tbl"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _perturbation() -> dict | None:
    from sekisho.reports import data

    return data.perturbation()


def value_columns(df: pd.DataFrame) -> list[str]:
    """The columns holding figures: numeric (not boolean), every value a number or
    missing; the first column is the table's label column and never a figure."""
    out = []
    for i, name in enumerate(df.columns):
        if i == 0:
            continue
        values = [_jsonable(v) for v in df[name]]
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            if pd.api.types.is_numeric_dtype(df[name].dtype) and not pd.api.types.is_bool_dtype(df[name].dtype) \
                    or any(v is not None for v in values):
                out.append(str(name))
    return out


def _as_integers(series: pd.Series) -> pd.Series:
    """Whole numbers as integers (nullable), so a CSV shows 1234, not 1234.0."""
    values = pd.to_numeric(series, errors="coerce")
    present = values.dropna()
    if len(present) and ((present % 1) == 0).all() and (present.abs() < 2 ** 53).all():
        return values.astype("Int64")
    if not len(present):
        return values.astype("Int64")
    return values


def with_status_columns(df: pd.DataFrame, perturbation: dict | None) -> tuple[pd.DataFrame, dict]:
    """The table for CSV: whole-number figures as integers, and after each figure column
    ``<col>_status`` and ``<col>_accuracy`` (the perturbation bound ±D of one protected
    count, for released whole-number figures; empty otherwise). Also the statuses for the
    JSON copy. The status is the guard's own (``released``, ``suppressed_k``,
    ``suppressed_dominance``, ``partial``) where the table's rows still match the
    answer's (``df.sekisho``); otherwise — a table reshaped in pandas — a missing figure
    is ``suppressed_k`` (withheld, or computed from a withheld one) and a present one
    ``released``."""
    d = None
    if perturbation and perturbation.get("method") == "cell-key" and perturbation.get("max_noise") is not None:
        d = int(perturbation["max_noise"])
    out = pd.DataFrame(index=df.index)
    statuses: dict[str, list[str]] = {}
    figures = set(value_columns(df))
    known = _guard_statuses(df)
    for name in df.columns:
        column = df[name]
        if str(name) not in figures:
            out[name] = column
            continue
        numbers = _as_integers(column)
        out[name] = numbers
        guard = known[name].tolist() if name in known.columns else [None] * len(column)
        status = [g or (SUPPRESSED_K if _jsonable(v) is None else RELEASED) for g, v in zip(guard, column)]
        statuses[str(name)] = status
        out[f"{name}{STATUS_SUFFIX}"] = status
        whole = str(numbers.dtype) == "Int64"
        out[f"{name}{ACCURACY_SUFFIX}"] = pd.array(
            [d if (whole and d is not None and s == RELEASED) else None for s in status], dtype="Int64")
    return out, statuses


def _guard_statuses(df: pd.DataFrame) -> pd.DataFrame:
    """The guard's per-value statuses of ``df`` (empty when it carries none or its rows
    no longer match the answer's)."""
    from sekisho.client.status import ResultStatus, StatusUnavailable

    try:
        return ResultStatus(df).status
    except StatusUnavailable:
        return pd.DataFrame(index=df.index)


class Report:
    """Context of one report notebook: its parameters and where tables are saved."""

    def __init__(self, *, tables_dir: str | None = None, **parameters: Any) -> None:
        self.parameters = parameters
        self.tables_dir = Path(tables_dir) if tables_dir else None
        if self.tables_dir:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
        self.saved: list[str] = []

    # ---- text --------------------------------------------------------------
    def section(self, title: str, description: str | None = None) -> None:
        from IPython.display import HTML

        from html import escape
        body = f"<h2>{escape(title)}</h2>"
        if description:
            body += f'<p class="desc">{escape(description)}</p>'
        _display(HTML(body))

    def note(self, text: str) -> None:
        from html import escape

        from IPython.display import HTML
        _display(HTML(f'<p class="note">{escape(text)}</p>'))

    # ---- tables ------------------------------------------------------------
    def table(self, key: str, title: str, df: pd.DataFrame, *, note: str | None = None,
              highlight: pd.Series | None = None, protected: bool = True) -> None:
        """Show ``df`` and save it as ``<key>.json`` / ``<key>.csv`` when publishing.

        Returns None, so that a notebook cell ending with a table does not display it twice."""
        from IPython.display import HTML

        df = df.reset_index(drop=True)
        html = table_html(df, highlight)
        # a small selection can leave nothing to show: say so rather than an empty grid
        empty = NO_DATA if df.empty or df.shape[1] == 0 else None
        notes = [n for n in (empty, note, PROTECTION_NOTE if protected else None,
                             perturbation_note(_perturbation()) if protected else None) if n]
        html += "".join(f'<p class="note">{n}</p>' for n in notes)
        _display(HTML(html))
        if self.tables_dir is not None:
            self._save(key, title, df, notes)

    def _save(self, key: str, title: str, df: pd.DataFrame, notes: list[str]) -> None:
        payload = {
            "key": key, "title": title, "parameters": self.parameters,
            "columns": [str(c) for c in df.columns],
            "rows": [[_jsonable(v) for v in row] for row in df.itertuples(index=False)],
            "notes": notes,
        }
        csv, status = with_status_columns(df, _perturbation())
        payload["status"] = status
        path = self.tables_dir / f"{key}.json"
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
        # utf-8-sig: opens correctly in Excel, which municipal staff use
        csv.to_csv(self.tables_dir / f"{key}.csv", index=False, encoding="utf-8-sig")
        self.saved.append(key)

    # ---- figures -----------------------------------------------------------
    def figure(self, fig) -> None:
        fig.update_layout(font_family=FONT, template="plotly_white",
                          margin=dict(l=60, r=30, t=60, b=50))
        if publishing():
            from IPython.display import HTML

            # plotly.js is embedded once per page by the publisher, never from a CDN
            _display(HTML(fig.to_html(full_html=False, include_plotlyjs=False,
                                      include_mathjax=False,
                                      config={"displaylogo": False, "responsive": True})))
        else:
            fig.show()
