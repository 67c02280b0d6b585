"""Condition influence per cell, applied as the query-wide rule is: in each cell, the
conditions that change it by fewer than k are not applied (threshold mode; the counts come
from ``cell_influence``).

Why not suppress such a cell: suppression tells a cell some condition changes by 1..k-1
from one it changes by 0. ``SELECT chome_code, sex, COUNT(*) FROM residents WHERE age <> a
GROUP BY 1, 2`` — ``age <> a`` made TRUE adds the target to her own cell and nobody to the
other sex's, so the suppressed cell names her sex (accuracy 1.0 on the 20k city, also as
``COUNT(*) FILTER (WHERE age <> a)``, also padded with ``AND age >= 15``).

The rule: for a cell c, S_c is the set of the query's neighbours (each atom replaced by
TRUE or FALSE, an IN element or BETWEEN bound dropped; not those that select nothing) that
change c by fewer than k contributors, perturbed — *zero included*. The cell is answered
as the query with S_c applied (per condition its preferred way when several of its
neighbours are in S_c, ``neighbours.batch``). A neighbour that changes nobody in c is in
S_c whether or not the target is there, and applying it changes nothing of c; one that
changes the target alone is in S_c as well: so S_c, the query the cell is answered as, and
that query's contributors in c are the same whether the target is in c or not (up to the
target's own row, which any query over c counts). Applied together the conditions of S_c
can change c more than each alone ("doubled" atoms: ``age <> a AND birth_month <> m``),
and the cell is then answered as the query without both — so the cell is the same as
asking without them.

A cell whose S_c is not empty has the status ``widened`` (``mark``): S_c holds the
neighbours that change it by none as well, so the mark does not tell 0 from 1 (marking
only the cells answered differently would). A count's interval is widened by what S_c can
change, so the count asked for lies in it. Where what S_c applies changes nobody in c —
one neighbour that changes nobody there, or dropped elements of one IN list that each
change nobody — the cell is computed as the query's own. Other cells are computed from one more cells statement
per distinct S_c (``MAX_WORLDS``; beyond that the remaining cells are suppressed).

Residual risk: decisions are on perturbed counts, so a neighbour changing c by exactly k-1
others plus the target is in S_c more often than one changing k-1 — the near-k tier the
query-wide rule also has; one round only (the query a cell is answered as is not checked
again per cell).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.neighbours import Variant, apply, batch
from sekisho.guard.protect.cellkey import KEY_RANGE, PerturbationTable
from sekisho.guard.protect.status import RELEASED, WIDENED, high_column, low_column, status_column
from sekisho.guard.protect.threshold import Cells, number
from sekisho.guard.sqltext import DIALECT

MAX_WORLDS = 8   # distinct queries cells are answered as, beyond the query's own
OWN = ""         # a cell answered as the query itself
MISSING = "-"    # a cell whose query is beyond MAX_WORLDS: suppressed
WHICH = "__w"


def cell_worlds(counts: Cells, groups: list[str], ptable: PerturbationTable, k: int, base: exp.Expression,
                neighbours: list[Variant], keep: list[int]) -> "CellWorlds":
    """From ``cell_influence_sql``'s counts: per cell, the query it is answered as."""
    n = number(counts, hidden.CONTRIBUTORS, np.int64)
    totals: dict[tuple[int, tuple], list[int]] = {}
    if len(n):
        ck = number(counts, hidden.CELL_KEY, np.int64)
        which = number(counts, WHICH, np.int64)
        keys = list(zip(*(counts[g].to_pylist() for g in groups))) if groups else [()] * len(n)
        for w, key, count, cell_key in zip(which.tolist(), keys, n.tolist(), ck.tolist()):
            if count:
                t = totals.setdefault((int(w), key), [0, 0])
                t[0] += count
                t[1] = (t[1] + cell_key) % KEY_RANGE
    items = list(totals.items())
    noisy = ptable.perturb_counts([t[1] for _, t in items], [t[0] for _, t in items]).tolist() if items else []
    large: dict[tuple, set[int]] = {}
    changed: dict[tuple, set[int]] = {}
    for ((w, key), _), value in zip(items, noisy):
        changed.setdefault(key, set()).add(w)
        if value >= k:
            large.setdefault(key, set()).add(w)
    kept = frozenset(keep)
    position = {id(v): i for i, v in enumerate(neighbours)}

    def own(applied: frozenset, key) -> bool:
        # nothing applied; or what is applied changes nobody in the cell: neighbours that
        # change nobody there, one of them or elements of one IN list (disjoint values:
        # dropping several changes what each changes, added up)
        if not applied:
            return True
        chosen = batch([(neighbours[i], 0) for i in sorted(applied)])
        if {position[id(v)] for v in chosen} & changed.get(key, set()):
            return False
        return len(chosen) == 1 or (len({v.index for v in chosen}) == 1
                                    and all(v.action.startswith("drop:") for v in chosen))

    applied_of = {key: kept - large.get(key, set()) for key in changed}
    own_cells = {key for key, applied in applied_of.items() if own(applied, key)}
    # a cell no neighbour changes: every neighbour applies (together they may change it)
    default_own = own(kept, None)
    wanted = {applied for key, applied in applied_of.items() if key not in own_cells}
    if not default_own:
        wanted.add(kept)
    # at most MAX_WORLDS, the same ones whatever order the counts came in: the smallest first
    ranked = sorted(wanted, key=lambda a: (len(a), sorted(a)))[:MAX_WORLDS]
    sql_of = {a: apply(base, batch([(neighbours[i], 0) for i in sorted(a)])).sql(dialect=DIALECT) for a in ranked}
    by_cell = {key: OWN if key in own_cells else sql_of.get(applied) for key, applied in applied_of.items()}
    sizes = {key: len(applied) for key, applied in applied_of.items()}
    default = None if default_own else sql_of.get(kept)
    if not default_own and default is None:
        default = MISSING
    return CellWorlds(by_cell, default, sizes, len(kept))


class CellWorlds:
    """Per cell the row SQL it is answered as (None: too many distinct ones, suppressed);
    cells not listed: ``default`` when no neighbour changes them (None: the query's own).
    ``sizes``: per listed cell |S_c|, the neighbours applied in it (zero-change ones
    included); ``default_size`` for the others."""

    def __init__(self, by_cell: dict, default: str | None, sizes: dict | None = None, default_size: int = 0):
        self.by_cell = by_cell
        self.default = default
        self._default_set = default is not None
        self.sizes = sizes or {}
        self.default_size = default_size

    def applied(self, key) -> int:
        """|S_c|: how many neighbours the cell is answered without (0: as asked). Counted
        with the neighbours that change nobody there, so it does not tell 0 from 1."""
        return self.sizes.get(key, self.default_size)

    def of(self, key) -> tuple[bool, str | None]:
        """(answered as another query?, its row SQL or None to suppress)."""
        sql = self.by_cell[key] if key in self.by_cell else self.default if self._default_set else OWN
        if sql == OWN:
            return False, None
        return True, None if sql in (None, MISSING) else sql

    def worlds(self) -> set[str]:
        return {s for s in (*self.by_cell.values(), self.default) if s and s != MISSING}

    def nbytes(self) -> int:
        return sum(len(s) for s in self.worlds()) + 64 * len(self.by_cell)

    def any_applied(self) -> bool:
        return bool(self.default_size) or any(self.sizes.values())

    def __bool__(self) -> bool:
        return self._default_set or any(s != OWN for s in self.by_cell.values())


NONE = CellWorlds({}, None)


def splice(cells: Cells, groups: list[str], plan: CellWorlds, world_cells: dict[str, Cells]
           ) -> tuple[Cells, int, int]:
    """``cells`` with each cell answered as its query (``world_cells``: each world's cells
    by the same cells SQL); a cell whose world has no row for it, or no world, gets 0
    contributors (suppressed). A cell of fewer than k is answered as its query too: kept
    suppressed, a cell the condition shrinks from k to k-1 would show the target (so such
    a cell can be released though the question asked selects fewer than k there).
    Returns the cells, how many were answered as another query and how many suppressed."""
    if not plan or not groups or not len(cells[hidden.CONTRIBUTORS]):
        return cells, 0, 0
    keys = list(zip(*(cells[g].to_pylist() for g in groups)))
    index = {sql: {key: i for i, key in enumerate(zip(*(c[g].to_pylist() for g in groups)))}
             for sql, c in world_cells.items()}
    keep = np.ones(len(keys), dtype=bool)
    takes: dict[str, list[int]] = {}
    suppressed = []
    answered = 0
    for i, key in enumerate(keys):
        other, sql = plan.of(key)
        if not other:
            continue
        keep[i] = False
        j = index.get(sql, {}).get(key) if sql is not None else None
        if j is None:
            keep[i] = True
            suppressed.append(i)
        else:
            takes.setdefault(sql, []).append(j)
            answered += 1
    out: Cells = {}
    for name, column in cells.items():
        parts_arrow = [column.filter(pa.array(keep))] if isinstance(column, pa.Array) else None
        parts_np = None if parts_arrow is not None else [np.asarray(column)[keep]]
        for sql, rows in takes.items():
            other = world_cells[sql][name]
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
    return out, answered, len(suppressed)


def mark(frame: Cells, plan: CellWorlds, aggregates, *, k: int, max_noise: int, count_kinds) -> tuple[Cells, int]:
    """The protected ``frame`` with every released value of a cell answered without some of
    the query's conditions (|S_c| > 0) marked ``widened``: a count's interval widened by
    what the conditions not applied can change (each fewer than k, perturbed: at most
    k - 1 + D), so that it holds the count asked for; a sum's or mean's dropped. Returns
    the frame and how many cells are marked."""
    if not plan.any_applied():
        return frame, 0
    n_keys = sum(1 for name in frame if name.startswith(hidden.GROUP_KEY_PREFIX))
    groups = [hidden.group_key(j) for j in range(n_keys)]
    keys = list(zip(*(_values(frame[g]) for g in groups))) if groups else []
    sizes = np.array([plan.applied(key) for key in keys], dtype=np.int64)
    hit = sizes > 0
    if not hit.any():
        return frame, 0
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
        if agg.kind in count_kinds:
            value = np.asarray(out[hidden.protected_value(j)], dtype=float)
            half = max_noise + sizes * (k - 1 + max_noise)
            low[rows] = np.maximum(value[rows] - half[rows], 0.0)
            high[rows] = value[rows] + half[rows]
        else:
            low[rows] = np.nan
            high[rows] = np.nan
        out[low_column(j)], out[high_column(j)] = low, high
    return out, int(hit.sum())


def _values(column) -> list:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)
