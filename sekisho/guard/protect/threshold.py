"""Threshold mode: minimum contributors, consistent perturbation, dominance, densification.

Per cell (``__n`` true distinct persons, ``__ck`` cell key):

* ``__n < k``  -> the cell is suppressed: every value NULL. If all group keys are bare
  dimension columns with a public domain, the result is densified to the full domain, so
  an absent group and a suppressed group look the same (NULL); otherwise suppressed rows
  are dropped, so a rare group's existence does not show either.
* counts are perturbed with the cell-key table (same contributors -> same noise);
  non-zero perturbed counts below ``min_count`` are shown as NULL;
* sums/means: NK and p% dominance rules (value NULL when dominated), then perturbed by a
  cell-key multiplier of the largest contribution; a mean is perturbed sum / perturbed count.

Residual risks (honest): perturbation is bounded (±D, default 2), so a difference of two
released counts still carries some signal about one person (differencing works
statistically over many targets if the attacker can form many *different* contributing
sets — each is a new independent draw); sums are protected by dominance and a noise of a
fraction of the largest contribution, which hides individual values but not small shifts
of large totals; densification covers only keys with declared domains, so computed keys
(CASE bands) leak the existence of groups with >= k persons only (not rare ones); a
NULL for a domain value reveals "fewer than k (maybe zero)".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.dominance import dominated

MAX_DENSE_CELLS = 200_000
COUNT_KINDS = ("count_rows", "count_nonnull", "count_persons", "count_households")


@dataclass
class ProtectionStats:
    cells: int = 0
    cells_suppressed: int = 0
    values_suppressed_dominance: int = 0
    values_suppressed_small: int = 0
    densified: bool = False
    rows_dropped: int = 0
    notes: list[str] = field(default_factory=list)


def densify(cells: pd.DataFrame, domains: list[tuple | None]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Put cells onto the public domain grid (absent cells: zero persons, no values).
    Returns (cells on the grid, cells whose keys fall outside the domain), or
    (cells, None) when the keys are not all public or the grid is too large."""
    if not domains or any(d is None for d in domains):
        return cells, None
    size = 1
    for d in domains:
        size *= len(d)
    if size > MAX_DENSE_CELLS:
        return cells, None
    keys = [f"__g{j}" for j in range(len(domains))]
    present = list(zip(*[cells[k].tolist() for k in keys])) if len(cells) else []
    index = {key: i for i, key in enumerate(present)}
    grid = list(itertools.product(*domains))
    grid_set = set(grid)
    take = np.array([index.get(key, -1) for key in grid], dtype=np.int64)
    found = take >= 0
    dense = {}
    for j, k in enumerate(keys):
        dense[k] = [key[j] for key in grid]
    for col in cells.columns:
        if col in keys:
            continue
        values = cells[col].to_numpy()
        if values.dtype.kind in "iufb":
            out = np.zeros(len(grid), dtype=values.dtype if values.dtype.kind != "b" else np.int64)
            out[found] = values[take[found]]
        else:
            out = np.empty(len(grid), dtype=object)
            out[:] = None
            out[found] = values[take[found]]
        dense[col] = out
    inside = pd.DataFrame(dense)
    outside_mask = np.array([key not in grid_set for key in present], dtype=bool)
    outside = cells[outside_mask] if len(cells) else cells
    return inside, outside


def _nth(values, i: int) -> float:
    """i-th element of a top-n list from DuckDB (absent cells carry NaN or None)."""
    if isinstance(values, (list, tuple, np.ndarray)) and len(values) > i and values[i] is not None:
        return float(values[i])
    return 0.0


def protect_threshold(cells: pd.DataFrame, aggregates, domains: list[tuple | None], *, k: int,
                      table: PerturbationTable, min_count: int, nk_n: int, nk_k: float,
                      p_percent: float, perturb: bool = True) -> tuple[pd.DataFrame, ProtectionStats]:
    stats = ProtectionStats()
    n_keys = len(domains)
    cells, outside = densify(cells.copy(), domains)
    if outside is not None:
        stats.densified = True
        # values outside the declared domain (e.g. NULL keys) are released only when not small
        keep_outside = outside[outside["__n"] >= k]
        stats.rows_dropped += len(outside) - len(keep_outside)
        cells = pd.concat([cells, keep_outside], ignore_index=True) if len(keep_outside) else cells
    n = cells["__n"].to_numpy(dtype=np.int64)
    ck = cells["__ck"].to_numpy(dtype=np.int64)
    small = n < k
    out = pd.DataFrame({f"__g{j}": cells[f"__g{j}"].to_numpy() for j in range(n_keys)})
    for j, agg in enumerate(aggregates):
        if agg.kind in COUNT_KINDS:
            raw = cells[f"__x{j}"].fillna(0).to_numpy(dtype=np.int64)
            value = table.perturb_counts(ck, raw) if perturb else raw
            tiny = (value > 0) & (value < min_count)
            stats.values_suppressed_small += int((tiny & ~small).sum())
            out[f"__v{j}"] = pd.array(np.where(small | tiny, 0, value), dtype="Int64")
            out.loc[small | tiny, f"__v{j}"] = pd.NA
            continue
        sums = cells[f"__s{j}"].fillna(0).to_numpy(dtype=float)
        nonnull = cells[f"__c{j}"].fillna(0).to_numpy(dtype=np.int64)
        tops = cells[f"__t{j}"] if f"__t{j}" in cells else pd.Series([None] * len(cells))
        top1 = np.array([_nth(t, 0) for t in tops], dtype=float)
        top2 = np.array([_nth(t, 1) for t in tops], dtype=float)
        total_abs = cells[f"__ta{j}"].fillna(0).to_numpy(dtype=float) if f"__ta{j}" in cells else np.abs(sums)
        if agg.cls in ("sensitive_measure", "derived_sensitive"):
            dom = dominated(total_abs, top1, top2, nk_n=nk_n, nk_k=nk_k, p_percent=p_percent)
        else:
            dom = np.zeros(len(cells), dtype=bool)
        stats.values_suppressed_dominance += int((dom & ~small).sum())
        psum = table.perturb_sums(ck, sums, top1, salt=j + 1) if perturb else sums
        if agg.kind == "sum":
            value = psum
        else:
            pcount = table.perturb_counts(ck, nonnull) if perturb else nonnull
            with np.errstate(divide="ignore", invalid="ignore"):
                value = np.where(pcount > 0, psum / np.maximum(pcount, 1), np.nan)
        value = np.where(small | dom | (nonnull == 0), np.nan, value)
        out[f"__v{j}"] = pd.array(value, dtype="Float64")
        out.loc[small | dom | (nonnull == 0), f"__v{j}"] = pd.NA
    stats.cells = len(out)
    # without densification the number of dropped groups would itself reveal how many
    # rare groups exist, so it is kept for the audit trail only (rows_dropped)
    stats.cells_suppressed = int(small.sum()) if stats.densified else 0
    if not stats.densified:
        keep = ~small
        stats.rows_dropped += int(small.sum())
        out = out[keep].reset_index(drop=True)
    return out, stats
