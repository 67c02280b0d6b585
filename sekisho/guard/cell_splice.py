"""Cells answered as the queries ``cell_widening`` resolves: each spliced from its world's
cells (``splice``) and marked ``widened`` with its interval widened (``mark``).

A ``Resolution`` says, per cell key, the row SQL the cell is answered as (``OWN``: the
query's own; None: no world, suppressed) and how many neighbours were applied there. The
world cells come from one cells statement per world, kept with the verdicts
(``WorldCells``), so a repeated query splices without scanning them again.
"""

from __future__ import annotations

import weakref

import numpy as np
import pyarrow as pa

from sekisho.guard import hidden
from sekisho.guard.protect.status import RELEASED, WIDENED, high_column, low_column, status_column
from sekisho.guard.protect.threshold import COUNT_KINDS, Cells, number

OWN = ""         # a cell answered as the query itself


class WorldCells(dict):
    """A world's cells as the verdicts' cache keeps them (a dict that can be referred to
    weakly, see ``Resolution``)."""


class Resolution:
    def __init__(self, world_of: dict, sizes: dict):
        self.world_of, self.sizes = world_of, sizes
        # a repeated query on one snapshot: the same cells (in any order) spliced from the
        # same (cached) world cells — where each cell comes from is kept with the world
        # cells it was found in (held weakly: what the verdicts' LRU drops is not kept
        # alive here, and then found again)
        self._sources = None   # ({world: weak ref to its cells}, {key: (world, row) or None})

    def worlds(self) -> set[str]:
        return {s for s in self.world_of.values() if s}


def splice(cells: Cells, keys: list[tuple], groups: list[str], resolution: Resolution,
           world_cells: dict[str, Cells], *, ptable=None, k: int = 0) -> tuple[Cells, int]:
    """``cells`` with each cell answered as its query (``world_cells``: each world's cells
    by the same cells SQL); a cell whose world has no row for it, or no world, gets 0
    contributors (suppressed). A cell of fewer than k is answered as its query too: kept
    suppressed, a cell the condition shrinks from k to k-1 would show the target (so such
    a cell can be released though the question asked selects fewer than k there).
    ``keys``: the cells' group-key values, row by row. With the snapshot's ``ptable`` and
    ``k``, a cell its world answers too far from the cell asked for is suppressed
    (``_beyond_interval``). Returns the cells and how many were suppressed."""
    if not groups or not keys:
        return cells, 0
    keep, takes, suppressed = _rows_from_worlds(keys, groups, resolution, world_cells)
    if ptable is not None and takes:
        keep, takes, suppressed = _beyond_interval(cells, keys, resolution, world_cells, keep, takes, suppressed,
                                                   ptable, k)
    if not takes and not suppressed:
        return cells, 0
    out: Cells = {}
    for name, column in cells.items():
        parts_arrow = [column.filter(pa.array(keep))] if isinstance(column, pa.Array) else None
        parts_np = None if parts_arrow is not None else [np.asarray(column)[keep]]
        for sql, pairs in takes.items():
            other, rows = world_cells[sql][name], [j for _, j in pairs]
            if parts_arrow is not None:
                parts_arrow.append(other.take(pa.array(rows, type=pa.int64())).cast(column.type))
            else:
                parts_np.append(np.asarray(other)[rows])
        out[name] = pa.concat_arrays(parts_arrow) if parts_arrow is not None else np.concatenate(parts_np)
    if suppressed:
        rows = np.flatnonzero(keep)
        position = {int(r): p for p, r in enumerate(rows)}
        n = np.array(out[hidden.CONTRIBUTORS], copy=True)
        n[[position[i] for i in suppressed]] = 0
        out[hidden.CONTRIBUTORS] = n
    return out, len(suppressed)


def _rows_from_worlds(keys: list[tuple], groups: list[str], resolution: Resolution, world_cells: dict[str, Cells]):
    """(rows kept from the query's cells, per world the rows taken from it, rows of no
    world: suppressed) for ``splice``."""
    last = resolution._sources
    if last is not None and last[0].keys() == world_cells.keys() \
            and all(last[0][sql]() is c for sql, c in world_cells.items()):
        source = last[1]
    else:
        index = {sql: {key: i for i, key in enumerate(zip(*(c[g].to_pylist() for g in groups)))}
                 for sql, c in world_cells.items()}
        source = {}
        for key, sql in resolution.world_of.items():
            if sql != OWN:
                j = index.get(sql, {}).get(key) if sql is not None else None
                source[key] = None if j is None else (sql, j)
        if all(isinstance(c, WorldCells) for c in world_cells.values()):
            resolution._sources = ({sql: weakref.ref(c) for sql, c in world_cells.items()}, source)
    keep = np.ones(len(keys), dtype=bool)
    takes: dict[str, list[int]] = {}
    suppressed = []
    for i, key in enumerate(keys):
        if key not in source:
            continue   # answered as asked
        found = source[key]
        if found is None:
            suppressed.append(i)
        else:
            keep[i] = False
            takes.setdefault(found[0], []).append((i, found[1]))
    return keep, takes, suppressed


def _beyond_interval(cells: Cells, keys: list[tuple], resolution: Resolution, world_cells: dict[str, Cells],
                     keep: np.ndarray, takes: dict, suppressed: list[int], ptable, k: int):
    """``takes`` without the cells whose world may lie outside the interval ``mark`` gives
    them, those suppressed instead. Why: each neighbour applied in a cell changes it by
    fewer than k, but applied together they can change it by far more — atoms that move
    nobody alone and thousands together (``WHEN x > 0 ... WHEN y > 0 ...`` with both made
    FALSE), a 家族類型 cell of 59,254 households answered as 85,152, its interval ±355.
    Decided on the contributors of the cell asked for and of its world, each perturbed
    from the decision table (``decision_counts``, never the release's): the interval
    holds the count asked for when they are no further apart than its half-width less
    the noise of the three counts (3D). One neighbour alone is within the interval by
    its definition and is not checked."""
    max_noise = ptable.max_noise
    own_n, own_ck = number(cells, hidden.CONTRIBUTORS, np.int64), number(cells, hidden.CELL_KEY, np.int64)
    out: dict[str, list[tuple[int, int]]] = {}
    far = []
    for sql, rows in takes.items():
        sizes = np.array([resolution.sizes.get(keys[i], 0) for i, _ in rows], dtype=np.int64)
        mine = np.array([i for i, _ in rows], dtype=np.int64)
        theirs = np.array([j for _, j in rows], dtype=np.int64)
        world = world_cells[sql]
        asked = ptable.decision_counts(own_ck[mine], own_n[mine])
        answered = ptable.decision_counts(number(world, hidden.CELL_KEY, np.int64)[theirs],
                                          number(world, hidden.CONTRIBUTORS, np.int64)[theirs])
        # (the interval's half-width less 3D: D + size (k - 1 + D) - 3D)
        beyond = (sizes >= 2) & (np.abs(answered - asked) > sizes * (k - 1 + max_noise) - 2 * max_noise)
        for (i, j), drop in zip(rows, beyond.tolist()):
            if drop:
                far.append(i)
            else:
                out.setdefault(sql, []).append((i, j))
    if not far:
        return keep, takes, suppressed
    keep = keep.copy()
    keep[far] = True   # kept in place, with no contributors: suppressed like a cell of no world
    return keep, out, sorted(suppressed + far)


def mark(frame: Cells, resolution: Resolution | None, aggregates, *, k: int, max_noise: int) -> Cells:
    """The protected ``frame`` with every released value of a cell answered without some of
    the query's conditions (|S_c| > 0) marked ``widened``: a count's interval widened by
    what the conditions not applied can change (each fewer than k, perturbed: at most
    k - 1 + D), so that it holds the count asked for; a sum's or mean's dropped."""
    if resolution is None or not any(resolution.sizes.values()):
        return frame
    n_keys = sum(1 for name in frame if name.startswith(hidden.GROUP_KEY_PREFIX))
    groups = [hidden.group_key(j) for j in range(n_keys)]
    keys = list(zip(*(_values(frame[g]) for g in groups))) if groups else []
    sizes = np.array([resolution.sizes.get(key, 0) for key in keys], dtype=np.int64)
    hit = sizes > 0
    if not hit.any():
        return frame
    out = dict(frame)
    for j, agg in enumerate(aggregates):
        st = status_column(j)
        if st not in out:
            continue
        status = np.array(out[st], dtype=object, copy=True)
        rows = hit & (status == RELEASED)
        status[rows] = WIDENED
        out[st] = status
        low = np.array(out[low_column(j)], dtype=float, copy=True)
        high = np.array(out[high_column(j)], dtype=float, copy=True)
        if agg.kind in COUNT_KINDS:
            value = np.asarray(out[hidden.protected_value(j)], dtype=float)
            half = max_noise + sizes * (k - 1 + max_noise)
            low[rows] = np.maximum(value[rows] - half[rows], 0.0)
            high[rows] = value[rows] + half[rows]
        else:
            low[rows] = np.nan
            high[rows] = np.nan
        out[low_column(j)], out[high_column(j)] = low, high
    return out


def _values(column) -> list:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)
