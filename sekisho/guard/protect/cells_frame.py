"""Cells as plain columns: the shape protected results take between the store and
Arrow, and the few operations on them both modes and densification use.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sekisho.guard import hidden

# Cells are plain columns: name -> numpy array (object arrays for lists and other
# scalars); NULL is None in object arrays and NaN in float arrays. Group keys (``__g*``)
# as they come from the store stay Arrow arrays: they go back to Arrow unchanged and are
# never converted to Python objects on the common path (text keys are looked up in
# Arrow's hash kernels, integer keys in a position table; numpy keys are accepted too).
# No pandas on the hot path.
Cells = dict
KEY_PREFIX = hidden.GROUP_KEY_PREFIX


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
