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
sets — each is a new independent draw; pairs formed by adding or removing one condition
are answered alike by the guard's condition-influence rule, ``sekisho.guard.influence``); sums are protected by dominance and a noise of a
fraction of the largest contribution, which hides individual values but not small shifts
of large totals; densification covers only keys with declared domains, so computed keys
(CASE bands) leak the existence of groups with >= k persons only (not rare ones); a
NULL for a domain value reveals "fewer than k (maybe zero)".
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.dominance import dominated

MAX_DENSE_CELLS = 200_000
COUNT_KINDS = ("count_rows", "count_nonnull", "count_persons", "count_households")

# Cells are plain columns: name -> numpy array (object arrays for strings and lists);
# NULL is None in object arrays and NaN in float arrays. No pandas on the hot path.
Cells = dict


@dataclass
class ProtectionStats:
    cells: int = 0
    cells_suppressed: int = 0
    values_suppressed_dominance: int = 0
    values_suppressed_small: int = 0
    densified: bool = False
    rows_dropped: int = 0
    population: int | None = None   # filtered population (internal: for the differencing alert)
    notes: list[str] = field(default_factory=list)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or \
        (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def cells_from_arrow(table: pa.Table) -> Cells:
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(float) if col.null_count else \
                col.to_numpy(zero_copy_only=False)
        elif _is_text(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(object, copy=False)  # str, NULL as None
        elif pa.types.is_nested(col.type):
            values = col.to_pylist()
            arr = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):  # element-wise: lists must stay list objects
                arr[i] = v
            out[name] = arr
        else:  # scalars (bool, date, decimal, ...) as Python objects
            arr = np.empty(len(col), dtype=object)
            arr[:] = col.to_pylist()
            out[name] = arr
    return out


def size(cells: Cells) -> int:
    return len(cells["__n"]) if "__n" in cells else 0


def take(cells: Cells, mask: np.ndarray) -> Cells:
    return {k: v[mask] for k, v in cells.items()}


def concat(a: Cells, b: Cells) -> Cells:
    return {k: np.concatenate([a[k], b[k].astype(a[k].dtype) if a[k].dtype != object else b[k]]) for k in a}


def number(cells: Cells, name: str, dtype=float) -> np.ndarray:
    """A numeric column with NULL as 0 (absent or empty aggregates)."""
    if name not in cells:
        return np.zeros(size(cells), dtype=dtype)
    values = cells[name]
    if values.dtype.kind in "iu":
        return values.astype(dtype)   # integers are finite; a copy, as below
    if values.dtype == object:
        values = np.array([0 if v is None else v for v in values], dtype=float)
    out = values.astype(float)   # a copy (always through float, as callers have relied on)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, copy=False)   # NaN -> 0, +-inf -> the largest finite
    return out if np.dtype(dtype) == out.dtype else out.astype(dtype)


def densify(cells: Cells, domains: list[tuple | None]) -> tuple[Cells, Cells | None]:
    """Put cells onto the public domain grid (absent cells: zero persons, no values).
    Returns (cells on the grid, cells whose keys fall outside the domain), or
    (cells, None) when the keys are not all public or the grid is too large."""
    if not domains or any(d is None for d in domains):
        return cells, None
    n_grid = 1
    for d in domains:
        n_grid *= len(d)
    if n_grid > MAX_DENSE_CELLS:
        return cells, None
    if n_grid == 0:
        return _densify_by_tuples(cells, domains)
    keys = [f"__g{j}" for j in range(len(domains))]
    n = size(cells)
    # keyed with the values' types too: (0, 1) and (False, True) are equal tuples
    grid = _grid(tuple((d, tuple(map(type, d))) for d in domains))
    if grid is None:   # repeated domain values: the grid has repeated keys
        return _densify_by_tuples(cells, domains)
    lookups, key_columns = grid
    # each key's position in its domain (dict lookups: the same equality as matching
    # whole key tuples against the grid), then the row-major position on the grid
    flat = np.zeros(n, dtype=np.int64)
    inside = np.ones(n, dtype=bool)
    for j, d in enumerate(domains):
        lookup = lookups[j]
        code = np.fromiter((lookup.get(v, -1) for v in cells[keys[j]].tolist()), dtype=np.int64, count=n) \
            if n else np.zeros(0, dtype=np.int64)
        inside &= code >= 0
        flat = flat * len(d) + code
    rows = np.flatnonzero(inside)
    positions = np.full(n_grid, -1, dtype=np.int64)
    positions[flat[rows]] = rows
    found = positions >= 0
    if int(found.sum()) != len(rows):   # two cells with one key: keep the old tie-break
        return _densify_by_tuples(cells, domains)
    dense: Cells = {key: column.copy() for key, column in zip(keys, key_columns)}
    for col, values in cells.items():
        if col in keys:
            continue
        if values.dtype.kind in "iuf":
            out = np.zeros(n_grid, dtype=values.dtype)
        else:
            out = np.empty(n_grid, dtype=object)
        out[found] = values[positions[found]]
        dense[col] = out
    return dense, take(cells, ~inside) if n else cells


@functools.lru_cache(maxsize=64)
def _grid(typed_domains: tuple[tuple[tuple, tuple], ...]) -> tuple[list[dict], list[np.ndarray]] | None:
    """Per public domain grid (the same few domains are asked again and again): each
    key's value -> position lookup, and the grid's key columns in row-major order; None
    when a domain repeats a value."""
    domains = [d for d, _ in typed_domains]
    lookups = []
    for d in domains:
        lookup = {v: i for i, v in enumerate(d)}
        if len(lookup) != len(d):
            return None
        lookups.append(lookup)
    n_grid = 1
    for d in domains:
        n_grid *= len(d)
    columns = []
    inner = n_grid
    for d in domains:
        inner //= len(d)
        values = np.empty(len(d), dtype=object)
        values[:] = list(d)
        if inner > 1:
            values = np.repeat(values, inner)
        outer = n_grid // len(values)
        column = np.tile(values, outer) if outer > 1 else values
        column.flags.writeable = False   # shared between calls: callers get copies
        columns.append(column)
    return lookups, columns


def _densify_by_tuples(cells: Cells, domains: list[tuple]) -> tuple[Cells, Cells | None]:
    """densify by matching key tuples one by one (repeated domain values or keys)."""
    keys = [f"__g{j}" for j in range(len(domains))]
    present = list(zip(*[cells[k].tolist() for k in keys])) if size(cells) else []
    index = {key: i for i, key in enumerate(present)}
    grid = list(itertools.product(*domains))
    grid_set = set(grid)
    positions = np.array([index.get(key, -1) for key in grid], dtype=np.int64)
    found = positions >= 0
    dense: Cells = {}
    for j, k in enumerate(keys):
        dense[k] = np.array([key[j] for key in grid], dtype=object)
    for col, values in cells.items():
        if col in keys:
            continue
        if values.dtype.kind in "iuf":
            out = np.zeros(len(grid), dtype=values.dtype)
        else:
            out = np.empty(len(grid), dtype=object)
        out[found] = values[positions[found]]
        dense[col] = out
    outside_mask = np.array([key not in grid_set for key in present], dtype=bool)
    return dense, take(cells, outside_mask) if size(cells) else cells


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
    out = values.astype(object)
    out[null] = None
    return out


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
        keep = number(outside, "__n", np.int64) >= k
        stats.rows_dropped += int((~keep).sum())
        if keep.any():
            cells = concat(cells, take(outside, keep))
    n = number(cells, "__n", np.int64)
    ck = number(cells, "__ck", np.int64)
    small = n < k
    out: Cells = {f"__g{j}": cells[f"__g{j}"] for j in range(n_keys)}
    for j, agg in enumerate(aggregates):
        if agg.kind in COUNT_KINDS:
            raw = number(cells, f"__x{j}", np.int64)
            value = table.perturb_counts(ck, raw) if perturb else raw
            tiny = (value > 0) & (value < min_count)
            stats.values_suppressed_small += int((tiny & ~small).sum())
            out[f"__v{j}"] = nullable(value, small | tiny)
            continue
        sums = number(cells, f"__s{j}")
        nonnull = number(cells, f"__c{j}", np.int64)
        tops = cells.get(f"__t{j}")
        top1, top2 = _tops(tops) if tops is not None else (np.zeros(len(n)), np.zeros(len(n)))
        total_abs = number(cells, f"__ta{j}") if f"__ta{j}" in cells else np.abs(sums)
        if agg.cls in ("sensitive_measure", "derived_sensitive"):
            dom = dominated(total_abs, top1, top2, nk_n=nk_n, nk_k=nk_k, p_percent=p_percent)
        else:
            dom = np.zeros(len(n), dtype=bool)
        stats.values_suppressed_dominance += int((dom & ~small).sum())
        psum = table.perturb_sums(ck, sums, top1, salt=j + 1) if perturb else sums
        if agg.kind == "sum":
            value = psum
        else:
            pcount = table.perturb_counts(ck, nonnull) if perturb else nonnull
            with np.errstate(divide="ignore", invalid="ignore"):
                value = np.where(pcount > 0, psum / np.maximum(pcount, 1), np.nan)
        out[f"__v{j}"] = nullable(value, small | dom | (nonnull == 0) | np.isnan(value))
    stats.cells = len(n)
    # without densification the number of dropped groups would itself reveal how many
    # rare groups exist, so it is kept for the audit trail only (rows_dropped)
    stats.cells_suppressed = int(small.sum()) if stats.densified else 0
    if not stats.densified:
        stats.rows_dropped += int(small.sum())
        out = take(out, ~small)
        stats.cells = int((~small).sum())
    return out, stats
