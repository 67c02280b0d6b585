"""Threshold mode: minimum contributors, consistent perturbation, dominance, densification
(``densify``; cells as columns: ``cells_frame``).

Per cell (``__n`` true distinct persons, ``__ck`` cell key):

* ``__n < k``  -> the cell is suppressed: every value NULL. If all group keys are bare
  dimension columns with a public domain, the result is densified to the full domain, so
  an absent group and a suppressed group look the same (NULL); otherwise suppressed rows
  are dropped, so a rare group's existence does not show either.
* counts are perturbed with the cell-key table (same contributors -> same noise);
  non-zero perturbed counts below ``min_count`` are shown as NULL;
* sums/means: NK and p% dominance rules (value NULL when dominated), then perturbed by a
  cell-key multiplier of the largest contribution; a mean is perturbed sum / perturbed count;
* every value gets its status and accuracy interval (``status``: released / suppressed_k /
  suppressed_dominance; ±D for counts, ±r·value for non-negative sums) in hidden columns.

Residual risks (honest): perturbation is bounded (±D, default 2), so a difference of two
released counts still carries some signal about one person (differencing works
statistically over many targets if the attacker can form many *different* contributing
sets — each is a new independent draw; pairs formed by adding or removing one condition
are answered alike by the guard's condition-influence rule, ``sekisho.guard.influence``); sums are protected by dominance and a noise of a
fraction of the largest contribution, which hides individual values but not small shifts
of large totals; densification covers only keys with declared domains, so computed keys
(CASE bands) leak the existence of groups with >= k persons only (not rare ones); a
NULL for a domain value reveals "fewer than k (maybe zero)".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from sekisho.guard import hidden
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.cells_frame import (KEY_PREFIX, Cells, cells_from_arrow, concat, number, size,  # noqa: F401
                                               take)
from sekisho.guard.protect.densify import MAX_DENSE_CELLS, densify  # noqa: F401 (dp.py, limits.py)
from sekisho.guard.protect.cellkey import SUM_NOISE_FRACTION
from sekisho.guard.protect.dominance import dominated
from sekisho.guard.protect.status import (around, high_column, low_column, nan_pair, status_column, statuses,
                                          sum_relative_bound)

COUNT_KINDS = ("count_rows", "count_nonnull", "count_persons", "count_households")
# in a view with one row per person these count the contributors: the cell's ``__n``
CONTRIBUTOR_COUNTS = ("count_rows", "count_persons")


@dataclass
class ProtectionStats:
    cells: int = 0
    cells_suppressed: int = 0
    values_suppressed_dominance: int = 0
    values_suppressed_small: int = 0
    densified: bool = False
    rows_dropped: int = 0
    # filtered population's (true size, cell key) (internal: differencing/decomposition alerts)
    population: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)


def counted(cells: Cells, j: int, kind: str) -> np.ndarray:
    """Count-like aggregate ``j``: its own column, or the contributor count ``__n`` where
    the cells SQL leaves it out as equal to it (``CONTRIBUTOR_COUNTS`` in a view with one
    row per person). Any other missing count is an error, never a zero."""
    if hidden.count(j) in cells:
        return number(cells, hidden.count(j), np.int64)
    if kind in CONTRIBUTOR_COUNTS:
        return number(cells, hidden.CONTRIBUTORS, np.int64)
    raise KeyError(hidden.count(j))


def _nth(values, i: int) -> float:
    """i-th element of a top-n list from DuckDB (absent cells carry NaN or None)."""
    if isinstance(values, (list, tuple, np.ndarray)) and len(values) > i and values[i] is not None:
        return float(values[i])
    return 0.0


def _tops(tops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and second largest contributions of every cell (0 where absent)."""
    n = len(tops)
    return (np.fromiter((_nth(t, 0) for t in tops), dtype=float, count=n),
            np.fromiter((_nth(t, 1) for t in tops), dtype=float, count=n))


def nullable(values: np.ndarray, null: np.ndarray) -> np.ndarray:
    """A released value column: float, NULL as NaN (the Cells convention for numbers;
    counts are exact in float64 up to 2**53, far beyond any population)."""
    out = values.astype(float)
    out[null] = np.nan
    return out


def measure_salt(agg) -> int:
    """The sum-noise salt of an aggregate: a function of the measure it sums alone."""
    name = getattr(agg, "measure", None) or ""
    return zlib.crc32(name.encode()) % 251 + 1


def protect_threshold(cells: Cells, aggregates, domains: list[tuple | None], *, k: int,
                      table: PerturbationTable, min_count: int, nk_n: int, nk_k: float,
                      p_percent: float, perturb: bool = True) -> tuple[Cells, ProtectionStats]:
    stats = ProtectionStats()
    n_keys = len(domains)
    cells, outside = densify(cells, domains)
    if n_keys == 0:
        stats.densified = True  # a global aggregate is one cell that always exists: NULL, never dropped
    if outside is not None:
        stats.densified = True
        # values outside the declared domain (e.g. NULL keys) are released only when not small
        keep = number(outside, hidden.CONTRIBUTORS, np.int64) >= k
        stats.rows_dropped += int((~keep).sum())
        if keep.any():
            cells = concat(cells, take(outside, keep))
    n = number(cells, hidden.CONTRIBUTORS, np.int64)
    ck = number(cells, hidden.CELL_KEY, np.int64)
    small = n < k
    out: Cells = {hidden.group_key(j): cells[hidden.group_key(j)] for j in range(n_keys)}
    for j, agg in enumerate(aggregates):
        if agg.kind in COUNT_KINDS:
            raw = counted(cells, j, agg.kind)
            # a conditional count is its own cell: its contributors' key and their number
            key = number(cells, hidden.own_contributors(j, "count")[1], np.int64) if hidden.own_contributors(j, "count")[1] in cells else ck
            few = small | (number(cells, hidden.own_contributors(j, "count")[0], np.int64) < k) if hidden.own_contributors(j, "count")[0] in cells else small
            if hidden.own_contributors(j, "count")[1] in cells and hidden.own_contributors(j, "count")[0] not in cells:
                few = small | (raw < k)   # one row per person: the count is its contributors
            value = table.perturb_counts(key, raw) if perturb else raw
            tiny = (value > 0) & (value < min_count)
            stats.values_suppressed_small += int((tiny & ~small).sum())
            out[hidden.protected_value(j)] = released = nullable(value, few | tiny)
            # status and accuracy (``status``): the cell-key bound ±D around what is released
            out[status_column(j)] = statuses(few | tiny)
            out[low_column(j)], out[high_column(j)] = around(released, table.max_noise if perturb else 0, floor=0.0)
            continue
        sums = number(cells, hidden.total(j))
        nonnull = number(cells, hidden.nonnull(j), np.int64)
        tops = cells.get(hidden.largest(j))
        top1, top2 = _tops(tops) if tops is not None else (np.zeros(len(n)), np.zeros(len(n)))
        total_abs = number(cells, hidden.absolute_total(j)) if hidden.absolute_total(j) in cells else np.abs(sums)
        if agg.cls in ("sensitive_measure", "derived_sensitive"):
            dom = dominated(total_abs, top1, top2, nk_n=nk_n, nk_k=nk_k, p_percent=p_percent)
        else:
            dom = np.zeros(len(n), dtype=bool)
        stats.values_suppressed_dominance += int((dom & ~small).sum())
        # the noise of a sum depends on its contributors and on what it measures, never on
        # where the aggregate stands in the query (a salt per position could be averaged)
        key = number(cells, hidden.own_contributors(j, "sum")[1], np.int64) if hidden.own_contributors(j, "sum")[1] in cells else ck
        if hidden.own_contributors(j, "sum")[0] in cells:
            small_j = small | (number(cells, hidden.own_contributors(j, "sum")[0], np.int64) < k)
        else:
            small_j = small
        psum = table.perturb_sums(key, sums, top1, salt=measure_salt(agg)) if perturb else sums
        if agg.kind == "sum":
            value = psum
        else:
            pcount = table.perturb_counts(key, nonnull) if perturb else nonnull
            with np.errstate(divide="ignore", invalid="ignore"):
                value = np.where(pcount > 0, psum / np.maximum(pcount, 1), np.nan)
        out[hidden.protected_value(j)] = released = nullable(value, small_j | dom | (nonnull == 0) | np.isnan(value))
        out[status_column(j)] = statuses(small_j, dom)
        bounds = getattr(agg, "bounds", None)
        if agg.kind == "sum" and bounds is not None and bounds[0] >= 0:
            share = nk_k if agg.cls in ("sensitive_measure", "derived_sensitive") else 1.0
            r = sum_relative_bound(SUM_NOISE_FRACTION, share) if perturb else 0.0
            out[low_column(j)], out[high_column(j)] = around(released, r * np.abs(released), floor=0.0)
        else:   # a mean, or a sum without a public non-negative bound: no interval
            out[low_column(j)], out[high_column(j)] = nan_pair(len(released))
    stats.cells = len(n)
    # without densification the number of dropped groups would itself reveal how many
    # rare groups exist, so it is kept for the audit trail only (rows_dropped)
    stats.cells_suppressed = int(small.sum()) if stats.densified else 0
    if not stats.densified:
        stats.rows_dropped += int(small.sum())
        out = take(out, ~small)
        stats.cells = int((~small).sum())
    return out, stats
