"""Per-cell status on result DataFrames: the answer's summary and cells table attached
to the DataFrame the backend returns, and read back aligned with its rows.

The values of a result stay plain; status (released / suppressed) and accuracy live in
``df.attrs`` (``attach``) and are read through ``ResultStatus`` — ``df.sekisho`` in the
kernel (``display`` registers the accessor and adds the HTML rendering). Rows are
matched by the answer's key columns, else by the index labels the result came with, so
``head()``, ``sort_values()`` and filters keep them right; when no match is possible,
``StatusUnavailable``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pyarrow as pa

from sekisho.protocol import cells_by_column

SUMMARY_ATTR = "sekisho"
CELLS_ATTR = "sekisho_cells"
INDEX_ATTR = "sekisho_index"
KEYS_ATTR = "sekisho_keys"


def attach(df: Any, summary: dict[str, Any] | None, cells: pa.Table | None) -> Any:
    """Put the summary and the cells table on a result DataFrame (its ``attrs``)."""
    if not isinstance(df, pd.DataFrame):
        return df
    # built apart and set last: pandas deep-copies a frame's attrs at every copy it makes
    attrs = {k: v for k, v in df.attrs.items() if k not in (CELLS_ATTR, INDEX_ATTR, KEYS_ATTR)}
    attrs[SUMMARY_ATTR] = summary
    if cells is not None and cells.num_rows == len(df):
        attrs[CELLS_ATTR] = cells   # an Arrow table: attrs compare with ==, a DataFrame would not
        attrs[INDEX_ATTR] = tuple(df.index.tolist())
        # the answer's other columns (its group keys) identify its rows whatever pandas
        # does to the index later (sort, reset_index, filters)
        described = set(cells_by_column(cells))
        keys = [c for c in df.columns if str(c) not in described]
        try:
            if keys:
                frame = df[keys].copy()
                frame.attrs = {}   # pandas would try to put them into the Arrow metadata
                attrs[KEYS_ATTR] = pa.Table.from_pandas(frame, preserve_index=False)
            else:
                attrs[KEYS_ATTR] = None
        except (pa.ArrowException, TypeError, ValueError):
            attrs[KEYS_ATTR] = None
    df.attrs = attrs
    return df


def _normal(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


class StatusUnavailable(LookupError):
    """The DataFrame's rows no longer match the answer they came from."""


class ResultStatus:
    """The disclosure summary and per-cell status/accuracy of a result DataFrame (read
    as ``df.sekisho``: ``display.SekishoAccessor``)."""

    def __init__(self, df: pd.DataFrame):
        self._df = df

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._df.attrs.get(SUMMARY_ATTR)

    @property
    def cells(self) -> pd.DataFrame | None:
        """The cells table as pandas, aligned with the DataFrame's rows."""
        table = self._df.attrs.get(CELLS_ATTR)
        if table is None:
            return None
        return self._aligned(table.to_pandas())

    def _positions(self) -> list[int]:
        """For each row of the DataFrame, its row in the answer: by the answer's key
        columns where they identify rows, else by the index labels it came with."""
        df = self._df
        keys = df.attrs.get(KEYS_ATTR)
        if keys is not None and keys.num_columns and all(c in df.columns for c in keys.column_names):
            stored = list(zip(*[[_normal(v) for v in keys.column(c).to_pylist()] for c in keys.column_names]))
            if len(set(stored)) == len(stored):
                lookup = {key: i for i, key in enumerate(stored)}
                current = zip(*[[_normal(v) for v in df[c].tolist()] for c in keys.column_names])
                positions = [lookup.get(key) for key in current]
                if all(p is not None for p in positions):
                    return positions
                raise StatusUnavailable("この DataFrame の行は関所の結果と対応づけられません（区分の値が変わっています）"
                                        " / the rows no longer match the guard's answer (key values changed)")
        labels = pd.Index(df.attrs.get(INDEX_ATTR, ()))
        if keys is not None and keys.num_columns or not labels.is_unique or not df.index.isin(labels).all():
            raise StatusUnavailable("この DataFrame の行は関所の結果と対応づけられません（行や区分が変わっています）"
                                    " / the rows no longer match the guard's answer")
        return labels.get_indexer(df.index).tolist()

    def _aligned(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.iloc[self._positions()]
        out.index = self._df.index
        return out

    def _part(self, part: str) -> pd.DataFrame:
        table = self._df.attrs.get(CELLS_ATTR)
        if table is None:
            return pd.DataFrame(index=self._df.index)
        columns = cells_by_column(table)
        data = {}
        for name in self._df.columns:
            entry = columns.get(str(name))
            if entry is not None and part in entry:
                data[name] = entry[part].to_pylist() if part == "status" else \
                    entry[part].to_numpy(zero_copy_only=False)
        return self._aligned(pd.DataFrame(data, index=pd.RangeIndex(table.num_rows)))

    @property
    def status(self) -> pd.DataFrame:
        """Status per value: ``released``, ``suppressed_k``, ``suppressed_dominance``,
        ``partial`` or ``widened`` (``sekisho.guard.protect.status``; None: unknown)."""
        return self._part("status")

    @property
    def low(self) -> pd.DataFrame:
        """Low end of each value's accuracy interval (NaN: none stated)."""
        return self._part("low")

    @property
    def high(self) -> pd.DataFrame:
        """High end of each value's accuracy interval (NaN: none stated)."""
        return self._part("high")

    @property
    def accuracy(self) -> dict[str, str]:
        """Accuracy kind per value column (``cell_key``, ``sum_relative``, ``dp_95``, ``none``)."""
        columns = cells_by_column(self._df.attrs.get(CELLS_ATTR))
        return {name: entry.get("accuracy", "") for name, entry in columns.items()}
