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
import zlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sekisho.guard import hidden
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.dominance import dominated

MAX_DENSE_CELLS = 200_000
COUNT_KINDS = ("count_rows", "count_nonnull", "count_persons", "count_households")
# in a view with one row per person these count the contributors: the cell's ``__n``
CONTRIBUTOR_COUNTS = ("count_rows", "count_persons")

# Cells are plain columns: name -> numpy array (object arrays for lists and other
# scalars); NULL is None in object arrays and NaN in float arrays. Group keys (``__g*``)
# as they come from the store stay Arrow arrays: they go back to Arrow unchanged and are
# never converted to Python objects on the common path (text keys are looked up in
# Arrow's hash kernels, integer keys in a position table; numpy keys are accepted too).
# No pandas on the hot path.
Cells = dict
KEY_PREFIX = hidden.GROUP_KEY_PREFIX


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


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or \
        (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def cells_from_arrow(table: pa.Table) -> Cells:
    return {name: _one_array(column) if name.startswith(KEY_PREFIX) else _to_numpy(column)
            for name, column in zip(table.column_names, table.columns)}


def _one_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One Arrow array; a small result comes in one chunk, taken as it is (converting
    a ChunkedArray goes through Arrow's heavier pandas-style path)."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _to_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    col = _one_array(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return col.to_numpy(zero_copy_only=False).astype(float) if col.null_count else \
            col.to_numpy(zero_copy_only=False)
    if _is_text(col.type):
        return col.to_numpy(zero_copy_only=False).astype(object, copy=False)  # str, NULL as None
    if pa.types.is_nested(col.type):
        values = col.to_pylist()
        arr = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):  # element-wise: lists must stay list objects
            arr[i] = v
        return arr
    arr = np.empty(len(col), dtype=object)   # scalars (bool, date, decimal, ...) as Python objects
    arr[:] = col.to_pylist()
    return arr


def size(cells: Cells) -> int:
    return len(cells[hidden.CONTRIBUTORS]) if hidden.CONTRIBUTORS in cells else 0


def take(cells: Cells, mask: np.ndarray) -> Cells:
    """The rows selected by ``mask`` (booleans or positions)."""
    positions = None
    out = {}
    for k, v in cells.items():
        if isinstance(v, pa.Array):
            if positions is None:   # Arrow takes positions (a numpy int64 array converts without a copy)
                positions = pa.array(np.flatnonzero(mask) if mask.dtype == bool else mask.astype(np.int64))
            out[k] = v.take(positions)
        else:
            out[k] = v[mask]
    return out


def _concat_column(a, b):
    if isinstance(a, pa.Array):
        return pa.concat_arrays([a, b if b.type == a.type else b.cast(a.type)])
    if isinstance(b, pa.Array):
        b = _to_numpy(b)
    return np.concatenate([a, b.astype(a.dtype) if a.dtype != object else b])


def concat(a: Cells, b: Cells) -> Cells:
    return {k: _concat_column(a[k], b[k]) for k in a}


def number(cells: Cells, name: str, dtype=float) -> np.ndarray:
    """A numeric column with NULL as 0 (absent or empty aggregates)."""
    if name not in cells:
        return np.zeros(size(cells), dtype=dtype)
    values = cells[name]
    if values.dtype.kind in "iu":
        return values.astype(dtype, copy=False)   # integers are finite (callers only read)
    if values.dtype == object:
        values = np.array([0 if v is None else v for v in values], dtype=float)
    out = values.astype(float)   # a copy: NaN and inf are replaced in place below
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, copy=False)   # NaN -> 0, +-inf -> the largest finite
    return out if np.dtype(dtype) == out.dtype else out.astype(dtype)


def counted(cells: Cells, j: int, kind: str) -> np.ndarray:
    """Count-like aggregate ``j``: its own column, or the contributor count ``__n`` where
    the cells SQL leaves it out as equal to it (``CONTRIBUTOR_COUNTS`` in a view with one
    row per person). Any other missing count is an error, never a zero."""
    if hidden.count(j) in cells:
        return number(cells, hidden.count(j), np.int64)
    if kind in CONTRIBUTOR_COUNTS:
        return number(cells, hidden.CONTRIBUTORS, np.int64)
    raise KeyError(hidden.count(j))


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
    keys = [hidden.group_key(j) for j in range(len(domains))]
    n = size(cells)
    # keyed with the values' types too: (0, 1) and (False, True) are equal tuples
    typed_domains = tuple((d, tuple(map(type, d))) for d in domains)
    grid = _grid(typed_domains)
    if grid is None:   # repeated domain values: the grid has repeated keys
        return _densify_by_tuples(cells, domains)
    lookups, key_columns = grid
    # each key's position in its domain (Python's equality, as matching whole key tuples
    # against the grid: see _codes), then the row-major position on the grid
    flat = np.zeros(n, dtype=np.int64)
    inside = np.ones(n, dtype=bool)
    for j, d in enumerate(domains):
        code = _codes(cells[keys[j]], typed_domains[j], lookups[j]) if n else np.zeros(0, dtype=np.int64)
        inside &= code >= 0
        flat = flat * len(d) + code
    rows = np.flatnonzero(inside)
    positions = np.full(n_grid, -1, dtype=np.int64)
    positions[flat[rows]] = rows
    found = positions >= 0
    if int(found.sum()) != len(rows):   # two cells with one key: keep the old tie-break
        return _densify_by_tuples(cells, domains)
    dense: Cells = {key: _grid_keys(cells[key], typed_domains, j, column)
                    for j, (key, column) in enumerate(zip(keys, key_columns))}
    for col, values in cells.items():
        if col not in keys:
            dense[col] = _onto_grid(values, positions, found)
    outside = ~inside
    return dense, take(cells, outside) if outside.any() else {k: v[:0] for k, v in cells.items()}


def _codes(keys, typed_domain: tuple[tuple, tuple], lookup: dict) -> np.ndarray:
    """Each key's position in ``domain`` (-1: not in it), by Python equality, as the
    lookup dict has it. Arrow integer keys against a domain of ints use a position
    table, Arrow text keys against a domain of strings Arrow's hash lookup (the same
    equality for these types); anything else goes through the dict."""
    if isinstance(keys, pa.Array):
        # (uint64 keys could wrap into a negative domain in int64: they take the paths below)
        table = _integer_table(typed_domain) if pa.types.is_signed_integer(keys.type) or \
            (pa.types.is_unsigned_integer(keys.type) and keys.type.bit_width < 64) else None
        if table is not None:   # integers: a position table indexed by value (no hashing)
            lo, positions = table
            values = keys.to_numpy(zero_copy_only=False)   # float with NaN when a key is NULL
            if keys.null_count:
                values = np.where(np.isnan(values), lo - 1, values)
            offset = values.astype(np.int64) - lo
            inside = (offset >= 0) & (offset < len(positions))
            return np.where(inside, positions[np.where(inside, offset, 0)], -1)
        lookup_options = _arrow_domain(typed_domain, keys.type)
        if lookup_options is not None:
            codes = pc.call_function("index_in", [keys], lookup_options)
            out = codes.to_numpy(zero_copy_only=False)   # NULL (not in the domain) as NaN, if any
            if codes.null_count:
                out = np.where(np.isnan(out), -1, out)
            return out.astype(np.int64)
        keys = keys.to_pylist()
    else:
        keys = keys.tolist()
    return np.fromiter(map(lookup.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))


@functools.lru_cache(maxsize=256)
def _integer_table(typed_domain: tuple[tuple, tuple]) -> tuple[int, np.ndarray] | None:
    """For a domain of (exactly) ints spanning a small range: its smallest value and the
    position of each value from there (-1: not in the domain); else None. Values stay
    within +-2**52, so keys read as floats (a column with a NULL) compare exactly."""
    domain, types = typed_domain
    if not domain or not all(t is int for t in types):
        return None
    lo, hi = min(domain), max(domain)
    if hi - lo >= 1 << 16 or lo < -(1 << 52) or hi > 1 << 52:
        return None
    positions = np.full(hi - lo + 1, -1, dtype=np.int64)
    positions[np.asarray(domain, dtype=np.int64) - lo] = np.arange(len(domain))
    return lo, positions


@functools.lru_cache(maxsize=256)
def _arrow_domain(typed_domain: tuple[tuple, tuple], arrow_type: pa.DataType) -> pc.SetLookupOptions | None:
    """The domain as an Arrow value set of the keys' type, when Arrow's equality is
    Python's for it; else None."""
    domain, types = typed_domain
    is_text = _is_text(arrow_type)
    if not (is_text or pa.types.is_integer(arrow_type)):
        return None   # floats (-0.0, NaN), dates, decimals, bools: Python's equality, via the dict
    wanted = str if is_text else int   # exactly: bool is not int here, nor is a float
    if not all(t is wanted for t in types):
        return None
    try:
        return pc.SetLookupOptions(value_set=pa.array(list(domain), type=arrow_type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):   # e.g. 300 for an int8 key
        return None


def _grid_keys(keys, typed_domains: tuple, j: int, grid_column: np.ndarray):
    """Key column ``j`` of the dense grid, of the same kind as the cells' keys: for Arrow
    keys an Arrow column of their type (cached), otherwise a copy of the numpy grid
    column (callers may change it)."""
    if isinstance(keys, pa.Array):
        return _arrow_grid_column(typed_domains, j, keys.type)
    return grid_column.copy()


@functools.lru_cache(maxsize=128)   # a column per key of the grids _grid keeps (64)
def _arrow_grid_column(typed_domains: tuple, j: int, arrow_type: pa.DataType) -> pa.Array:
    return _as_arrow(_grid(typed_domains)[1][j], arrow_type)


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
    keys = [hidden.group_key(j) for j in range(len(domains))]
    present = list(zip(*[_pylist(cells[k]) for k in keys])) if size(cells) else []
    index = {key: i for i, key in enumerate(present)}
    grid = list(itertools.product(*domains))
    grid_set = set(grid)
    positions = np.array([index.get(key, -1) for key in grid], dtype=np.int64)
    found = positions >= 0
    dense: Cells = {}
    for j, k in enumerate(keys):
        column = np.array([key[j] for key in grid], dtype=object)
        dense[k] = _as_arrow(column, cells[k].type) if isinstance(cells[k], pa.Array) else column
    for col, values in cells.items():
        if col not in keys:
            dense[col] = _onto_grid(values, positions, found)
    outside_mask = np.array([key not in grid_set for key in present], dtype=bool)
    return dense, take(cells, outside_mask) if size(cells) else cells


def _onto_grid(values, positions: np.ndarray, found: np.ndarray) -> np.ndarray:
    """A value column on the grid: grid cell i takes row ``positions[i]`` where ``found``,
    else zero (numbers) or None."""
    if isinstance(values, pa.Array):   # a key column beyond the domains: a value here
        values = _to_numpy(values)
    if values.dtype.kind in "iuf":
        out = np.zeros(len(positions), dtype=values.dtype)
    else:
        out = np.empty(len(positions), dtype=object)
    out[found] = values[positions[found]]
    return out


def _pylist(column) -> list:
    return column.to_pylist() if isinstance(column, pa.Array) else column.tolist()


def _as_arrow(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    try:
        return pa.array(values.tolist(), type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(values.tolist())   # a domain not of the key's type: converted (or refused) on output


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
            out[hidden.protected_value(j)] = nullable(value, few | tiny)
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
        out[hidden.protected_value(j)] = nullable(value, small_j | dom | (nonnull == 0) | np.isnan(value))
    stats.cells = len(n)
    # without densification the number of dropped groups would itself reveal how many
    # rare groups exist, so it is kept for the audit trail only (rows_dropped)
    stats.cells_suppressed = int(small.sum()) if stats.densified else 0
    if not stats.densified:
        stats.rows_dropped += int(small.sum())
        out = take(out, ~small)
        stats.cells = int((~small).sum())
    return out, stats
