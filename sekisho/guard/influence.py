"""Condition influence (threshold mode): every condition in a query must change who is
counted by at least k contributors — or the query is refused.

Why: consistent cell-key perturbation gives the *same* answer to the *same* set of
contributors. Two queries that differ by one condition which removes a single person
therefore answer identically when that person is absent and (usually) differently when
present: ``COUNT(P)`` vs ``COUNT(P AND NOT <target>)`` reveals membership. Refusing only
the "removes one person" case would make the refusal itself the signal, so a condition
that changes *fewer than k* contributors — including one that changes nobody — is refused,
decided on a perturbed count like every other threshold.

For each *atom* (a leaf condition: a comparison, IS, LIKE, a boolean column, one element
of an IN list, one bound of a BETWEEN) in the boundary's row-level SELECT — its WHERE
clauses, JOIN conditions, CASE/IF conditions of group keys and derived columns — the two
neighbouring queries an analyst could ask instead are formed by replacing the atom with
TRUE and with FALSE. The contributors whose rows (included or not, cell, aggregated
value) differ between the query and a neighbour are counted with their cell key; the
perturbed count must reach k.

Cost: the contributors each neighbour changes are counted in one scan of the view —
one aggregate with a FILTER per neighbour — when the row SELECT is one SELECT over one
table (``_influence_flat``) or over one unit scope (``_influence_units``: every
neighbour's version of the household features computed in the same GROUP BY); only
other shapes (joins, nested derived tables) compare each neighbour's rows with the
query's (``_influence_general``). The three agree on counts and cell keys
(tests/test_guard_influence.py); the SQL is built in ``neighbour_counts`` and
``neighbour_units``. Conditions certain to be small go together, those near k one per
round (``decide``); the certain ones closest first, as many as stay below k together
(how far leaving them out moves the query, the drift, is counted for 2, 4, 8, ... of
them in one scan: overlapping conditions add up), else the closest one alone.

Residual risk (documented, not closed): neighbours that differ by a *constant*
(``age >= 40`` vs ``age >= 41``) are not formed; such pairs are trackers across queries,
flagged by the differencing alert and defeated only by DP mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard import cell_splice, cell_widening
from sekisho.guard.cell_influence import (cell_influence_sql, counted_neighbours, query_and_cell_sql, units_and_cells_sql,
                                         units_batch_sql)
from sekisho.guard.protect.cells_frame import take
from sekisho.guard.sqltext import DIALECT
from sekisho.guard.errors import QueryRefused
from sekisho.guard.joins import ROW_IDENTITY
from sekisho.guard.lru import SizedLRU
from sekisho.guard.neighbour_counts import unit_scope_shape, influence_sql, is_flat
from sekisho.guard.neighbours import MAX_ATOMS, MAX_ATOMS_UNIT_SCOPE, Variant, apply, closest, neighbourhood, \
    ranked_conditions
from sekisho.guard.protect.cellkey import KEY_RANGE, PerturbationTable
from sekisho.guard.protect.threshold import Cells, number

MAX_NEIGHBOURS = 96        # neighbouring queries checked for condition influence in the general form
MAX_NEIGHBOURS_FLAT = 1024  # ... when all are evaluated in one scan of a single view
INFLUENCE_ROUNDS = 12   # certain conditions go together, those near k one per round: at most this many rounds
CACHE_SIZE = 2048
CACHE_BYTES = 16 * 2 ** 20   # estimated bytes of the verdicts kept, all users (``verdict_bytes``)


@dataclass(frozen=True)
class Verdict:
    """The rule's decision for one boundary: the conditions left out and the row SELECT
    without them (``None``, nothing left out: the query runs as written)."""
    row_sql: str | None = None
    left_out: tuple[str, ...] = ()
    # per condition left out, what it was answered as: ``TRUE`` (always holds) or ``FALSE``
    # (never holds) — "not applied" alone would hide which of the two the answer is for
    treated_as: tuple[str, ...] = ()
    # the query as answered (without what was left out): its contributors and their cell
    # key, as the rule's last scan counted them (its ``__n``/``__ck``) — the population
    # check then needs no scan of its own; None when no scan counted that query
    population: tuple[int, int] | None = None
    # per cell, the query it is answered as: the query as answered with the neighbours
    # that change that cell by fewer than k applied (``cell_widening``)
    cell_worlds: cell_widening.CellWorlds = cell_widening.NONE
    # the query's own cells (``__g*``, ``__n``, ``__ck``) as answered (``row_sql``) when the
    # rule's scans counted them — a flat query's first scan when nothing was left out, a
    # unit scope's last per-cell scan: for this request only (``VerdictCache`` keeps
    # none), so a new query of contributor counts needs no cells scan of its own
    own_cells: Cells | None = field(default=None, compare=False, repr=False)


def decide(row: exp.Select, *, columns: list[str], identifiers: frozenset[str], k: int, filtered: bool,
           person_unique: bool, ptable: PerturbationTable, fetch: Callable[[str], Cells],
           catalog=None) -> Verdict:
    """Apply the rule to one boundary's row SELECT: a condition that changes who is
    counted by fewer than k contributors (perturbed count) is not applied — the query is
    answered as its neighbour without it, whether the condition changes nobody or one
    person, so the answer cannot tell the two apart. ``fetch`` runs one counting SQL on
    the snapshot; ``ptable`` is that snapshot's cell-key table; ``catalog`` (the role's)
    gives the public domains ``enumerated_keys`` reasons over.

    Conditions are left out in two tiers, each round deciding on the query without what
    earlier rounds left out:

    * *certain*: a condition changing at most k - 1 - D contributors (exact count; D the
      noise bound) is small whatever the noise, so they go together — closest first, the
      longest run of them whose combined drift stays below k (``_together``), as
      overlapping conditions can add up;
    * *near k*: the others whose perturbed count is below k go one per round, the
      closest first, and the rest are decided again.

    Why not all at once: a condition near k decided on counts that still include a
    certain one is decided by the person that one isolates. In ``COUNT(P)`` against
    ``COUNT(P AND age <> a)`` (P near k) the second cell's own conditions change |P| - 1
    persons when the target is in P and |P| when not, so near k they were left out for
    one and kept for the other (tests/test_guard_language_attacks.py, near-k). Once
    ``age <> a`` (certain: it changes 0 or 1) is left out, both cells are the same
    expression and get the same decisions. The tiers' border is an exact count, but a
    condition just above it is almost always left out in the next round too (only a
    noise draw of +D keeps it), so which tier a condition falls in says next to nothing;
    the order within the near tier is by perturbed counts, never exact ones."""
    certain = k - 1 - ptable.max_noise
    current, left_out = row, []
    worlds = cell_widening.NONE
    answered = None   # (contributors, cell key) of ``current`` when a scan counted them
    own_cells = None
    max_atoms = MAX_ATOMS_UNIT_SCOPE if unit_scope_shape(row) is not None else MAX_ATOMS
    for round_ in range(INFLUENCE_ROUNDS + 1):
        base, _, neighbours = neighbourhood(current, identifiers, max_atoms, render=False)
        if not neighbours:
            break
        limit = MAX_NEIGHBOURS_FLAT if is_flat(base) else MAX_NEIGHBOURS
        if len(neighbours) > limit:
            raise QueryRefused("too_complex", part=f"{len(neighbours) // 2}+ conditions")
        # the neighbours counted per cell (not those that select nothing), found once a round
        kept = functools.cache(lambda: counted_neighbours(base, neighbours))
        shared = _query_and_cells(base, neighbours, kept, columns, ptable, fetch) \
            if round_ == 0 and person_unique else None
        noisy, exact, counts = shared[:3] if shared is not None else \
            _counted(base, neighbours, columns, person_unique, ptable, fetch)
        if round_ == 0 and filtered and any(v < k for v in noisy):
            # a query that selects fewer than k is refused as such, before any condition
            # is left out (which would otherwise widen it into an answer)
            population = ptable.perturb_counts([int(number(counts, hidden.CELL_KEY, np.int64)[0])],
                                               [int(number(counts, hidden.CONTRIBUTORS, np.int64)[0])])[0]
            if population < k:
                raise QueryRefused("filter_population_below_k")
        small = [(neighbours[i], value) for i, value in enumerate(noisy) if value < k]
        if not small:
            # ``base`` is ``current`` prepared: the same rows, so the same contributors
            answered = (int(number(counts, hidden.CONTRIBUTORS, np.int64)[0]),
                        int(number(counts, hidden.CELL_KEY, np.int64)[0]))
            groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
            own_cells = shared[4] if shared is not None else None   # (first round only)
            if groups and kept():
                with_own = units_and_cells_sql(base, neighbours, columns, kept()) \
                    if shared is None and not person_unique else None
                if shared is not None:
                    per_cell = shared[3]
                elif with_own is not None:   # a unit scope: the query's own cells from the same GROUP BY
                    per_cell, own_cells = _split_own(fetch(with_own), len(neighbours), groups)
                else:
                    per_cell = fetch(cell_influence_sql(base, neighbours, columns, person_unique=person_unique,
                                                        keep=kept()))
                worlds = cell_widening.cell_worlds(per_cell, groups, ptable, k, base, neighbours, kept(),
                                                   catalog, fetch, recount=functools.partial(
                                                       _recount, identifiers=identifiers, max_atoms=max_atoms,
                                                       columns=columns, person_unique=person_unique, k=k,
                                                       ptable=ptable, catalog=catalog))
            break
        if round_ == INFLUENCE_ROUNDS:
            # still not stable after the rounds allowed: refuse rather than guess
            raise QueryRefused("condition_influence_below_k", part=min(small, key=lambda o: o[1])[0].atom)
        sure = [(neighbours[i], value) for i, value in enumerate(noisy) if exact[i] <= certain]
        chosen = _together(base, sure, k, columns, person_unique, ptable, fetch) if sure else closest(small)
        current, left_out = _leave_out(base, chosen, left_out)
    if not left_out:
        return Verdict(population=answered, cell_worlds=worlds, own_cells=own_cells)
    named = sorted(left_out)   # sorted, not in the order left out
    return Verdict(current.sql(dialect=DIALECT), tuple(a for a, _ in named), tuple(t for _, t in named),
                   population=answered, cell_worlds=worlds, own_cells=own_cells)


def _recount(trees: list[exp.Expression], fetch: Callable[[str], Cells], *, identifiers: frozenset[str],
             max_atoms: int, columns: list[str], person_unique: bool, k: int, ptable: PerturbationTable,
             catalog) -> list[cell_widening.CellWorlds]:
    """The per-cell decisions for each of ``trees`` (a boundary's row SELECT with some
    neighbours applied): its neighbours counted per cell — none when it has no condition
    left (``cell_widening.CellWorlds.second``). Trees over one unit scope are counted in
    one statement (``units_batch_sql``), others one scan each."""
    prepared = []
    for tree in trees:
        base, _, neighbours = neighbourhood(tree, identifiers, max_atoms, render=False)
        prepared.append((base, neighbours, counted_neighbours(base, neighbours)))
    counted = [p for p in prepared if p[2]]
    batch = units_batch_sql(counted, columns) if len(counted) > 1 else None
    shared = {}
    if batch is not None:
        sql, offsets = batch
        counts = fetch(sql)
        which = number(counts, cell_widening.WHICH, np.int64)
        for (base, neighbours, _), offset in zip(counted, offsets):
            mask = (which >= offset) & (which < offset + len(neighbours))
            own = take(counts, mask)
            own[cell_widening.WHICH] = which[mask] - offset
            shared[id(base)] = own
    groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
    out = []
    for base, neighbours, keep in prepared:
        if not keep:
            out.append(cell_widening.CellWorlds(base, neighbours, frozenset(), {}, {}, {}))
            continue
        counts = shared.get(id(base))
        if counts is None:
            counts = fetch(cell_influence_sql(base, neighbours, columns, person_unique=person_unique, keep=keep))
        out.append(cell_widening.cell_worlds(counts, groups, ptable, k, base, neighbours, keep, catalog, fetch))
    return out


def _together(base: exp.Expression, sure: list[tuple[Variant, int]], k: int, columns: list[str],
              person_unique: bool, ptable: PerturbationTable, fetch: Callable[[str], Cells]) -> list[Variant]:
    """The certain conditions left out this round: per condition its preferred way, the
    conditions closest first (``ranked_conditions``); the longest run of the first 2, 4,
    8, ... or all of them whose drift (the contributors leaving them out together changes,
    perturbed) stays below k — all runs counted in one scan — else the closest alone (its
    change is certain, so it needs no check). Why runs: redundant conditions (a CASE
    branch's atoms each implied by the others or by an earlier branch) change nobody
    alone and thousands together; one condition a round cost a unit scope's scan per
    condition (reports/06: 5 rounds a query at 530k)."""
    ranked = ranked_conditions(sure)
    if len(ranked) == 1:
        return ranked[0]
    sizes = sorted({min(2 ** j, len(ranked)) for j in range(1, len(ranked).bit_length() + 1)})
    runs = [[v for condition in ranked[:size] for v in condition] for size in sizes]
    drifts = [Variant(atom="", index=-1, action="drift", tree=apply(base, run)) for run in runs]
    noisy = _counted(base, drifts, columns, person_unique, ptable, fetch)[0]
    below = [run for run, value in zip(runs, noisy) if value < k]
    return below[-1] if below else ranked[0]


def treated_as(variant: Variant) -> str:
    """What a left-out condition is answered as: an atom replaced by TRUE, a BETWEEN bound
    dropped and a join's existence assumed hold always (``TRUE``); an atom replaced by
    FALSE, an IN element dropped and a join's existence denied never hold (``FALSE``)."""
    return "FALSE" if variant.action == "false" or variant.action.startswith("drop:") else "TRUE"


def _leave_out(base: exp.Expression, chosen: list[Variant], left_out: list) -> tuple[exp.Expression, list]:
    """``base`` without the ``chosen`` conditions, and the conditions left out so far. A
    condition fixing a join's row identity (``joins.ROW_IDENTITY``) is never left out: the
    rows would fan out, so the query is refused, not widened."""
    nodes = list(base.walk())
    for variant in chosen:
        if 0 <= variant.index < len(nodes) and nodes[variant.index].meta.get(ROW_IDENTITY):
            raise QueryRefused("condition_influence_below_k", part=variant.atom)
    return apply(base, chosen), left_out + [(v.atom, treated_as(v)) for v in chosen]


def _counted(base: exp.Expression, variants: list[Variant], columns: list[str], person_unique: bool,
             ptable: PerturbationTable, fetch: Callable[[str], Cells]) -> tuple[list[int], list[int], Cells]:
    """The perturbed and the exact count of contributors each of ``variants`` changes (one
    scan), and the counting SQL's cells (``__n``/``__ck``: the query's own contributors)."""
    counts = fetch(influence_sql(base, variants, columns, person_unique=person_unique))
    n = [int(number(counts, f"{hidden.CONTRIBUTORS}{i}", np.int64)[0]) for i in range(len(variants))]
    ck = [int(number(counts, f"{hidden.CELL_KEY}{i}", np.int64)[0]) for i in range(len(variants))]
    return [int(v) for v in ptable.perturb_counts(ck, n)], n, counts


def _query_and_cells(base: exp.Expression, neighbours: list[Variant], kept: Callable[[], list[int]],
                     columns: list[str], ptable: PerturbationTable, fetch: Callable[[str], Cells]):
    """The first round's counts and the per-cell counts from one grouped scan
    (``cell_influence.query_and_cell_sql``), when the query's shape allows: (perturbed,
    exact, the query's own ``__n``/``__ck``, per-cell counts without the query's own
    rows, the query's own cells) — or None."""
    sql = query_and_cell_sql(base, neighbours, columns, kept)
    if sql is None:
        return None
    cells = fetch(sql)
    own_w = len(neighbours)
    which = number(cells, cell_widening.WHICH, np.int64)
    n = number(cells, hidden.CONTRIBUTORS, np.int64)
    ck = number(cells, hidden.CELL_KEY, np.int64)
    totals = np.zeros((own_w + 1, 2), dtype=np.int64)
    if len(which):
        np.add.at(totals, which, np.stack([n, ck], axis=1))
    counted = set(kept())
    # a neighbour that selects nothing changes every contributor of the query
    exact = [int(totals[i, 0]) if i in counted else int(totals[own_w, 0]) for i in range(own_w)]
    keys = [int(totals[i, 1]) % KEY_RANGE if i in counted else int(totals[own_w, 1]) % KEY_RANGE
            for i in range(own_w)]
    noisy = [int(v) for v in ptable.perturb_counts(keys, exact)] if exact else []
    own = {hidden.CONTRIBUTORS: np.array([totals[own_w, 0]]), hidden.CELL_KEY: np.array([totals[own_w, 1] % KEY_RANGE])}
    per_cell, own_cells = _split_own(cells, own_w, [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)])
    return noisy, exact, own, per_cell, own_cells


def _split_own(cells: Cells, own_w: int, groups: list[str]) -> tuple[Cells, Cells]:
    """(the neighbours' per-cell rows, the query's own cells: ``__w`` = ``own_w``)."""
    mine = number(cells, cell_widening.WHICH, np.int64) == own_w

    def rows(where: np.ndarray, names) -> Cells:
        return {name: (cells[name].filter(pa.array(where)) if isinstance(cells[name], pa.Array)
                       else np.asarray(cells[name])[where]) for name in names}

    return rows(~mine, cells), rows(mine, groups + [hidden.CONTRIBUTORS, hidden.CELL_KEY])


def verdict_bytes(key: tuple[str, str, str], found: Verdict | QueryRefused) -> int:
    """A verdict's memory, estimated: its strings and the key's, plus the objects around them."""
    held = (found.row_sql or "", *found.left_out, *found.treated_as) if isinstance(found, Verdict) else \
        (found.reason, found.part)
    cells = found.cell_worlds.nbytes() if isinstance(found, Verdict) else 0
    return 400 + cells + sum(len(s) for s in key) + sum(len(s) for s in held)


class VerdictCache:
    """Verdicts per (user, snapshot, row SQL), bounded LRU by count and by estimated size
    (``verdict_bytes``). Per user: a shared cache would answer a query another analyst
    asked before faster (a timing channel). A refusal is cached as well (it is as
    deterministic as a verdict on one snapshot)."""

    def __init__(self, size: int = CACHE_SIZE, max_bytes: int = CACHE_BYTES):
        self._items = SizedLRU(size, max_bytes, verdict_bytes)
        # the cells of the queries cells are answered as (``cell_widening``), per (user,
        # snapshot, cells SQL): a repeated query does not scan them again
        self._worlds = SizedLRU(size, max_bytes, lambda key, cells: 200 + sum(len(s) for s in key) + sum(
            getattr(c, "nbytes", 0) for c in cells.values()))

    def world_cells(self, key: tuple[str, str, str], compute: Callable[[], Cells]) -> Cells:
        found = self._worlds.get(key)
        if found is None:
            found = cell_splice.WorldCells(compute())
            self._worlds.put(key, found)
        return found

    def verdict(self, key: tuple[str, str, str], decide_now: Callable[[], Verdict]) -> Verdict:
        found = self._items.get(key)
        if found is None:
            try:
                found = decide_now()
            except QueryRefused as refusal:
                found = refusal
            self._items.put(key, replace(found, own_cells=None) if isinstance(found, Verdict) else found)
        if isinstance(found, QueryRefused):
            raise QueryRefused(found.code, part=found.part)
        return found

    def account(self, key: tuple[str, str, str]) -> None:
        """Count a kept verdict's size again (its cell decisions grow when a release first
        needs a second tier, ``cell_widening.CellWorlds.second``)."""
        found = self._items.get(key)
        if isinstance(found, Verdict):
            self._items.put(key, found)

    def clear(self) -> None:
        self._items.clear()
        self._worlds.clear()

    def keys(self) -> list[tuple[str, str, str]]:
        return self._items.keys()

    @property
    def bytes(self) -> int:
        return self._items.bytes

    def __len__(self) -> int:
        return len(self._items)
