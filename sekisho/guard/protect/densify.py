"""Densification: cells put onto the grid of their keys' public domains.

A cell absent from the store's answer is a cell with zero persons; on a public domain
it must still appear (as a count of 0, or suppressed), or its absence would tell that
nobody is in it. ``densify`` puts cells onto the grid of the domains (``MAX_DENSE_CELLS``
at most) and returns apart the cells whose keys fall outside (protected on their own).
Kept apart from the threshold rules: it is the bulk of the vectorised key matching
(Arrow lookups, integer tables, tuple fallbacks) and is shared by both modes.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sekisho.guard import hidden
from sekisho.guard.protect.cells_frame import Cells, _is_text, _to_numpy, size, take

MAX_DENSE_CELLS = 200_000


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
