"""What an analyst may query, in Japanese: ``con.describe()`` and ``con.describe("residents")``.

``describe(views)`` lists the caller's views (name, title, purpose, columns);
``describe(views, "residents")`` lists one view's columns: type, class (what the guard
lets you do with the column), description and a summary of its public domain. Both come
from what the guard service already tells the client (``GET api/views``: the policy's
view declarations for the caller's role) — nothing here reads data. The result shows as
an HTML table in a notebook (``_repr_html_``) and as an aligned text table elsewhere; its
``frame`` is a plain DataFrame.

``order_by_domains(df, views, sql)`` makes result columns with an ordered public domain
come back in that order: a string column whose name is a view column with a domain (age
bands ``0-4, 5-9, …, 100+``, 続柄, 地域ブロック) becomes a pandas ``Categorical`` ordered by
the policy's domain (so ``sort_values``, ``groupby`` and pivots follow it), and the rows
are sorted by the domain order — by the query's own ``ORDER BY`` keys when it has plain
column keys, else by those columns left to right — instead of as text. A column holding
any value outside the domain is left as it is: nothing is ever turned into NaN.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from html import escape
from typing import Any

import pandas as pd
import sqlglot
from sqlglot import exp

from sekisho.errors import SekishoError

CLASS_LABELS_JA = {
    "privacy_unit": "個人ID（人数の単位。値は出力できません）",
    "linkage": "結合用ID（値は出力できません）",
    "dimension": "区分（GROUP BY・WHERE に使えます）",
    "measure": "数量（SUM・AVG で集計します）",
    "sensitive_measure": "機微な数量（集計のみ。保護を強めて出力）",
}
TYPE_LABELS_JA = {"string": "文字列", "integer": "整数", "int64": "整数", "int32": "整数", "boolean": "真偽値",
                  "float": "小数", "float64": "小数", "date": "日付"}
MAX_LISTED = 8            # a domain this short is listed whole


class UnknownView(SekishoError, LookupError):
    """``describe`` was asked for a view the caller does not have."""


@dataclass
class Description:
    """A table for people: a title, column headers, rows of text, notes under it."""
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.headers)

    def to_pandas(self) -> pd.DataFrame:
        return self.frame

    def _repr_html_(self) -> str:
        head = "".join(f"<th style=\"text-align:left\">{escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td style=\"text-align:left\">{escape(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<li>{escape(n)}</li>" for n in self.notes)
        return (f"<div class=\"sekisho-describe\"><strong>{escape(self.title)}</strong>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + (f"<ul style=\"font-size:smaller\">{notes}</ul>" if notes else "") + "</div>")

    def __str__(self) -> str:
        widths = [max([_width(h)] + [_width(r[i]) for r in self.rows]) for i, h in enumerate(self.headers)]
        line = "  ".join(_pad(h, w) for h, w in zip(self.headers, widths)).rstrip()
        lines = [self.title, line, "  ".join("-" * w for w in widths)]
        lines += ["  ".join(_pad(c, w) for c, w in zip(row, widths)).rstrip() for row in self.rows]
        lines += [f"* {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def domain_summary(spec: dict[str, Any]) -> str:
    """A column's public domain or bounds in a few words (Japanese)."""
    domain = spec.get("domain")
    if domain:
        values = list(domain)
        n = len(values)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and n > MAX_LISTED \
                and values == list(range(values[0], values[0] + n)):
            return f"{values[0]}〜{values[-1]}（{n}区分）"
        if n <= MAX_LISTED:
            return "、".join(_value(v) for v in values)
        return "、".join(_value(v) for v in values[:4]) + f"、…、{_value(values[-1])}（{n}区分、この順）"
    bounds = spec.get("bounds")
    if bounds:
        return f"{_value(bounds[0])}〜{_value(bounds[1])}（集計の上下限）"
    if spec.get("class") in ("privacy_unit", "linkage"):
        return "（値は出力できません）"
    return "—"


def describe(views: dict[str, Any], name: str | None = None) -> Description:
    """The caller's views (``name`` None) or the columns of view ``name``."""
    if name is None:
        rows = []
        for view in sorted(views):
            spec = views[view] if isinstance(views[view], dict) else {}
            columns = spec.get("columns") or {}
            rows.append([view, str(spec.get("title") or ""), str(spec.get("purpose") or "—"),
                         str(len(columns))])
        notes = ['列の説明: con.describe("ビュー名")　例: con.describe("residents")',
                 '表として使う: t = con.table("residents")']
        if not rows:
            notes = ["この役割で利用できるビューはありません。"]
        return Description("利用できるビュー", ["ビュー", "名称", "利用目的", "列数"], rows, notes)
    if name not in views:
        raise UnknownView(f"ビュー {name!r} はありません。利用できるビュー: {', '.join(sorted(views)) or '（なし）'} "
                          f"/ no view {name!r} for your role")
    spec = views[name] if isinstance(views[name], dict) else {}
    rows = []
    for column, col in (spec.get("columns") or {}).items():
        col = col if isinstance(col, dict) else {"type": col}
        type_name = str(col.get("type") or "").lstrip("!")
        rows.append([column, TYPE_LABELS_JA.get(type_name, type_name), CLASS_LABELS_JA.get(col.get("class"), str(col.get("class") or "—")),
                     str(col.get("description") or ""), domain_summary(col)])
    title = f"{name}（{spec['title']}）の列" if spec.get("title") else f"{name} の列"
    notes = ["集計結果は保護済みです: 少人数のセルは秘匿、件数には小さな撹乱が加わります。",
             "区分の値は「値の範囲」の順で返ります（年齢階級など）。"]
    if "is_current" in (spec.get("columns") or {}):
        notes.insert(0, "現在の住民だけを数えるには is_current で絞ります（例: t.filter(t.is_current)）。")
    return Description(title, ["列", "型", "分類", "説明", "値の範囲"], rows, notes)


# ---- ordered domains in results ---------------------------------------------------------

def column_domains(views: dict[str, Any]) -> dict[str, list[str]]:
    """Column name -> its ordered string domain, for names every view that has them
    declares with the same domain."""
    found: dict[str, list[str]] = {}
    conflicting: set[str] = set()
    for spec in views.values():
        columns = spec.get("columns") if isinstance(spec, dict) else None
        for column, col in (columns or {}).items():
            domain = col.get("domain") if isinstance(col, dict) else None
            if not domain or not all(isinstance(v, str) for v in domain):
                continue
            if found.setdefault(column, list(domain)) != list(domain):
                conflicting.add(column)     # two views disagree: no order is the right one
    return {k: v for k, v in found.items() if k not in conflicting}


def _order_keys(sql: str | None) -> list[tuple[str, bool]] | None:
    """The outermost ``ORDER BY`` as (column name, ascending), None when there is none;
    ``[]`` when it orders by anything but plain columns (then the guard's order stands)."""
    if not sql:
        return None
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except Exception:
        return []
    order = tree.args.get("order") if tree is not None else None
    if order is None:
        return None
    keys = []
    for item in order.expressions:
        column = item.this
        if not isinstance(column, exp.Column):
            return []
        keys.append((column.name, not item.args.get("desc")))
    return keys


def order_by_domains(df: Any, views: dict[str, Any] | None, sql: str | None = None) -> Any:
    """``df`` with its ordered-domain columns as ordered Categoricals and its rows in
    domain order (see the module). Row labels are kept, so anything aligned by label
    (``df.sekisho``) stays aligned. Anything else is returned as it is."""
    if not isinstance(df, pd.DataFrame) or not views or df.empty:
        return df
    domains = column_domains(views)
    converted = []
    for column in df.columns:
        domain = domains.get(column) if isinstance(column, str) else None
        if domain is None or isinstance(df[column].dtype, pd.CategoricalDtype):
            continue
        values = df[column]
        present = values.dropna()
        if not all(isinstance(v, str) for v in present) or not set(present).issubset(domain):
            continue
        df[column] = pd.Categorical(values, categories=domain, ordered=True)
        converted.append(column)
    if not converted:
        return df
    keys = _order_keys(sql)
    if keys is None:
        # no ORDER BY: by the leading key columns up to the last converted one (a float
        # column is no key: then by the converted columns alone)
        leading = list(df.columns[:max(list(df.columns).index(c) for c in converted) + 1])
        by = leading if not any(pd.api.types.is_float_dtype(df[c].dtype) for c in leading) else converted
        ascending = [True] * len(by)
    elif keys and all(k in df.columns for k, _ in keys) and any(k in converted for k, _ in keys):
        by, ascending = [k for k, _ in keys], [a for _, a in keys]
    else:
        return df
    ordered = df.sort_values(by=by, ascending=ascending, kind="stable", na_position="last")
    ordered.attrs = df.attrs
    return ordered
