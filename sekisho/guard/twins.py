"""Twin aggregates answered alike where they are a few contributors apart (issue 15, class
4): two aggregates of one kind in one query (``cells.twin_pairs``) whose contributors differ
by 0..k-1 in a cell give the second the first's answer there. It reads only the released
frame and the store's cells, so it stands apart from ``cell_influence`` (the per-cell counts
of neighbouring queries).
"""

from __future__ import annotations

import numpy as np

from sekisho.guard import hidden
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.status import high_column, low_column, status_column
from sekisho.guard.protect.threshold import Cells, number


def equalize_twins(frame: Cells, cells: Cells, pairs: list[tuple[int, int]], n_keys: int,
                   ptable: PerturbationTable, k: int) -> tuple[Cells, int]:
    """The protected ``frame`` with, in every cell where two aggregates of one kind
    (``cells.twin_pairs``) have contributors 0..k-1 apart (perturbed), the second answered
    as the first: value, status and accuracy. ``COUNT(*) FILTER (WHERE (C AND age <= 40) OR
    pad)`` beside the same with 39 — each condition changes many, neither is a neighbour of
    the other, and consistent noise answers the two alike exactly when the target is not in
    the cell; suppressing the cell where they differ would show which cell the target is in.
    Answered alike, they show nothing (the first's own value, as asking it alone would).
    ``cells``: the store's cells with the pairs' ``__tw``/``__twk`` columns; ``frame``:
    ``protect_threshold``'s output (densified, so matched by group keys). Returns how many
    (cell, pair) answers were made equal where they were apart."""
    if not pairs or not len(cells[hidden.CONTRIBUTORS]):
        return frame, 0
    groups = [hidden.group_key(j) for j in range(n_keys)]
    cell_rows = list(zip(*(cells[g].to_pylist() for g in groups))) if groups else [()]
    frame_rows = list(zip(*(_values(frame[g]) for g in groups))) if groups else [()] * _length(frame)
    where = {key: i for i, key in enumerate(frame_rows)}
    out = dict(frame)
    changed = 0
    for j1, j2 in pairs:
        apart = number(cells, f"__tw{j1}_{j2}", np.int64)
        noisy = ptable.decision_counts(number(cells, f"__twk{j1}_{j2}", np.int64), apart)
        rows = [where[key] for key, a, v in zip(cell_rows, apart.tolist(), noisy.tolist())
                if a >= 1 and v < k and key in where]
        if not rows:
            continue
        for column in (hidden.protected_value, status_column, low_column, high_column):
            first, second = column(j1), column(j2)
            if first in out and second in out:
                values = np.array(out[second], dtype=object if out[second].dtype == object else None, copy=True)
                values[rows] = np.asarray(out[first])[rows]
                out[second] = values
        changed += len(rows)
    return out, changed


def _values(column) -> list:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)


def _length(frame: Cells) -> int:
    return len(next(iter(frame.values()))) if frame else 0
