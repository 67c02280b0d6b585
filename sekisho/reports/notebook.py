"""Set-up shared by every report notebook: resolve parameters, open the guard connection,
and small reshaping helpers (long protected tables -> readable wide tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sekisho.reports import data
from sekisho.reports.periods import add_months, check_month, label_ja, year_windows
from sekisho.reports.render import Report
from sekisho.reports.sql import AREA_COLUMNS, AREA_LABELS

AREA_LEVELS = tuple(AREA_COLUMNS)


def latest_month(sql=None) -> str:
    """The last month that has any 異動 (the data's reference month), asked of the guard."""
    df = (sql or data.sql)("SELECT idou_ym, COUNT(*) AS n FROM movements GROUP BY idou_ym")
    months = df.loc[df["n"].notna(), "idou_ym"].dropna().astype(str)
    if months.empty:
        raise RuntimeError("no 異動 months visible through the guard; is the store empty?")
    return months.max()


@dataclass
class Context:
    base_month: str
    compare_month: str
    period: int
    area_level: str
    report: Report
    windows: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def area_column(self) -> str:
        return AREA_COLUMNS[self.area_level]

    @property
    def area_label(self) -> str:
        return AREA_LABELS[self.area_column]

    @property
    def year_first(self) -> str:
        """First month of the 12 months ending at 基準年月 (the 'base year')."""
        return add_months(self.base_month, -11)

    @property
    def period_first(self) -> str:
        return add_months(self.base_month, -12 * self.period + 1)

    def caption(self) -> str:
        return (f"基準年月: {label_ja(self.base_month)}　比較年月: {label_ja(self.compare_month)}"
                f"　期間: {self.period}年（{label_ja(self.period_first)}〜{label_ja(self.base_month)}）"
                f"　地域区分: {self.area_label}")


def start(*, base_month: str | None, compare_month: str | None, period: int,
          area_level: str, tables_dir: str | None = None) -> Context:
    base = check_month(base_month, "base_month (基準年月)") if base_month else latest_month()
    compare = (check_month(compare_month, "compare_month (比較年月)") if compare_month
               else add_months(base, -12))
    if compare >= base:
        raise ValueError(f"compare_month (比較年月) {compare} must be before base_month {base}")
    if not isinstance(period, int) or not 1 <= period <= 5:
        raise ValueError(f"period (期間) must be 1..5 years, got {period!r}")
    if area_level not in AREA_COLUMNS:
        raise ValueError(f"area_level (地域区分) must be one of {AREA_LEVELS}, got {area_level!r}")
    params = dict(base_month=base, compare_month=compare, period=period, area_level=area_level)
    report = Report(tables_dir=tables_dir, **params)
    return Context(base, compare, period, area_level, report, year_windows(base, period))


def order_by(df: pd.DataFrame, column: str, order: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Sort ``df`` by ``column`` following a public order (unknown values last)."""
    rank = {v: i for i, v in enumerate(order)}
    return df.sort_values(column, key=lambda s: s.map(lambda v: rank.get(v, len(rank))),
                          kind="stable").reset_index(drop=True)


def wide(df: pd.DataFrame, index: str, columns: str, values: str, *,
         index_order: Any = None, column_order: Any = None) -> pd.DataFrame:
    """Long -> wide; a combination the guard returned without a value stays missing (秘匿)."""
    if df.empty:  # the guard withheld the whole table
        table = pd.DataFrame(index=pd.Index(list(index_order or []), name=index),
                             columns=list(column_order or []), dtype=float)
    else:
        table = df.pivot_table(index=index, columns=columns, values=values, aggfunc="first",
                               dropna=False)
    if column_order is not None:
        table = table.reindex(columns=[c for c in column_order])
    if index_order is not None:
        present = list(table.index)
        table = table.reindex([i for i in index_order] + [i for i in present if i not in index_order])
    table.columns = [str(c) for c in table.columns]
    return table.reset_index()


def lookup(df: pd.DataFrame, key: dict[str, Any], value: str = "n") -> float:
    """The value of the one row matching ``key`` (NaN if absent or suppressed)."""
    mask = pd.Series(True, index=df.index)
    for k, v in key.items():
        mask &= df[k] == v
    hit = df.loc[mask, value]
    return float(hit.iloc[0]) if len(hit) and pd.notna(hit.iloc[0]) else float("nan")


def scalar(df: pd.DataFrame, value: str = "n") -> float:
    """The single value of a one-row result (NaN if suppressed or not reported)."""
    if df.empty or pd.isna(df[value].iloc[0]):
        return float("nan")
    return float(df[value].iloc[0])
