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
(tests/test_guard_influence.py); the SQL is built in ``neighbour_counts``.

Residual risk (documented, not closed): neighbours that differ by a *constant*
(``age >= 40`` vs ``age >= 41``) are not formed; such pairs are trackers across queries,
flagged by the differencing alert and defeated only by DP mode.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
import threading

import numpy as np
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.analyze import DIALECT
from sekisho.guard.errors import QueryRefused
from sekisho.guard.neighbour_counts import unit_scope_shape, influence_sql, is_flat
from sekisho.guard.neighbours import MAX_ATOMS, MAX_ATOMS_UNIT_SCOPE, Variant, apply, batch, closest, neighbourhood
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.guard.protect.threshold import Cells, number

MAX_NEIGHBOURS = 96        # neighbouring queries checked for condition influence in the general form
MAX_NEIGHBOURS_FLAT = 1024  # ... when all are evaluated in one scan of a single view
INFLUENCE_ROUNDS = 8   # leaving conditions out can make others small: re-checked up to this often
CACHE_SIZE = 2048


@dataclass(frozen=True)
class Verdict:
    """The rule's decision for one boundary: the conditions left out and the row SELECT
    without them (``None``, nothing left out: the query runs as written)."""
    row_sql: str | None = None
    left_out: tuple[str, ...] = ()


def decide(row: exp.Select, *, columns: list[str], identifiers: frozenset[str], k: int, filtered: bool,
           person_unique: bool, ptable: PerturbationTable, fetch: Callable[[str], Cells]) -> Verdict:
    """Apply the rule to one boundary's row SELECT: a condition that changes who is
    counted by fewer than k contributors (perturbed count) is not applied — the query is
    answered as its neighbour without it, whether the condition changes nobody or one
    person, so the answer cannot tell the two apart. ``fetch`` runs one counting SQL on
    the snapshot; ``ptable`` is that snapshot's cell-key table."""
    current, left_out = row, []
    pending = None   # (query before the last batch, its closest single choice, left_out before)
    max_atoms = MAX_ATOMS_UNIT_SCOPE if unit_scope_shape(row) is not None else MAX_ATOMS
    for round_ in range(INFLUENCE_ROUNDS + 1):
        base, _, neighbours = neighbourhood(current, identifiers, max_atoms)
        compared = list(neighbours)
        if pending is not None:
            # how far the last batch moved the query: it must stay below k as well
            compared.append(Variant(atom="", index=-1, action="drift", tree=pending[0]))
        if not compared:
            break
        limit = MAX_NEIGHBOURS_FLAT if is_flat(base) else MAX_NEIGHBOURS
        if len(compared) > limit:
            raise QueryRefused("too_complex", part=f"{len(neighbours) // 2}+ conditions")
        counts = fetch(influence_sql(base, compared, columns, person_unique=person_unique))
        n = [int(number(counts, f"{hidden.CONTRIBUTORS}{i}", np.int64)[0]) for i in range(len(compared))]
        ck = [int(number(counts, f"{hidden.CELL_KEY}{i}", np.int64)[0]) for i in range(len(compared))]
        noisy = [int(v) for v in ptable.perturb_counts(ck, n)]
        if round_ == 0 and filtered and any(v < k for v in noisy):
            # a query that selects fewer than k is refused as such, before any condition
            # is left out (which would otherwise widen it into an answer)
            population = ptable.perturb_counts([int(number(counts, hidden.CELL_KEY, np.int64)[0])],
                                               [int(number(counts, hidden.CONTRIBUTORS, np.int64)[0])])[0]
            if population < k:
                raise QueryRefused("filter_population_below_k")
        if pending is not None:
            before, single, left_before = pending
            pending = None
            if noisy.pop() >= k:
                # the batch changed too much together: leave out only the closest one
                current, left_out = apply(before, single), left_before + [v.atom for v in single]
                continue
        small = [(neighbours[i], value) for i, value in enumerate(noisy) if value < k]
        if not small:
            break
        if round_ == INFLUENCE_ROUNDS:
            # still not stable after the rounds allowed: refuse rather than guess
            raise QueryRefused("condition_influence_below_k", part=min(small, key=lambda o: o[1])[0].atom)
        chosen = batch(small)
        if len(chosen) > len(closest(small)):
            pending = (base, closest(small), list(left_out))
        current = apply(base, chosen)
        left_out += [v.atom for v in chosen if v.atom not in left_out]
    else:
        if pending is not None:
            raise QueryRefused("condition_influence_below_k")
    return Verdict(current.sql(dialect=DIALECT), tuple(left_out)) if left_out else Verdict()


class VerdictCache:
    """Verdicts per (user, snapshot, row SQL), bounded LRU. Per user: a shared cache would
    answer a query another analyst asked before faster (a timing channel). A refusal is
    cached as well (it is as deterministic as a verdict on one snapshot)."""

    def __init__(self, size: int = CACHE_SIZE):
        self._size = size
        self._items: OrderedDict[tuple[str, str, str], Verdict | QueryRefused] = OrderedDict()
        self._lock = threading.Lock()

    def verdict(self, key: tuple[str, str, str], decide_now: Callable[[], Verdict]) -> Verdict:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
        if found is None:
            try:
                found = decide_now()
            except QueryRefused as refusal:
                found = refusal
            with self._lock:
                self._items[key] = found
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
        if isinstance(found, QueryRefused):
            raise QueryRefused(found.code, part=found.part)
        return found

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def keys(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
