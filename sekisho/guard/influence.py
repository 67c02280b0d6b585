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
from sqlglot.optimizer.merge_subqueries import merge_subqueries

from sekisho.guard import hidden
from sekisho.guard.analyze import DIALECT
from sekisho.guard.errors import QueryRefused
from sekisho.guard.hidden import PID, RKEY
from sekisho.guard.neighbours import Variant, apply, batch, closest, neighbourhood
from sekisho.guard.protect.cellkey import PerturbationTable, cell_key_sql
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
    for round_ in range(INFLUENCE_ROUNDS + 1):
        base, _, neighbours = neighbourhood(current, identifiers)
        compared = list(neighbours)
        if pending is not None:
            # how far the last batch moved the query: it must stay below k as well
            before = pending[0]
            compared.append(Variant(atom="", index=-1, action="drift", sql=before.sql(dialect=DIALECT),
                                    tree=before))
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


# ---- counting the contributors a neighbour changes --------------------------------------------
def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _flat(row: exp.Expression) -> exp.Select | None:
    """The row SELECT merged into one SELECT over one table (a copy), or None."""
    try:
        tree = merge_subqueries(row.copy())
    except Exception:
        return None
    if not isinstance(tree, exp.Select) or tree.args.get("joins") or tree.args.get("group") \
            or tree.args.get("having") or tree.args.get("distinct") or tree.args.get("with_"):
        return None
    from_ = tree.args.get("from_")
    if from_ is None or not isinstance(from_.this, exp.Table):
        return None
    if sum(1 for _ in tree.find_all(exp.Select)) != 1:
        return None
    return tree


def _parts(select: exp.Select) -> tuple[str, dict[str, str]]:
    where = select.args.get("where")
    cond = f"COALESCE(({where.this.sql(dialect=DIALECT)}), FALSE)" if where is not None else "TRUE"
    return cond, {p.alias_or_name: p.this.sql(dialect=DIALECT) if isinstance(p, exp.Alias) else
                  p.sql(dialect=DIALECT) for p in select.expressions}


def is_flat(row: exp.Expression) -> bool:
    """Whether the neighbours of ``row`` can all be counted in one scan."""
    return _flat(row) is not None


def influence_sql(row: exp.Expression, neighbours: list[Variant], columns: list[str], *,
                  person_unique: bool) -> str:
    """One SQL returning ``__n<i>`` (contributors changed by neighbour i) and ``__ck<i>``
    (their cell key), and ``__n``/``__ck`` for the contributors the query itself selects.
    ``columns``: the row SELECT's cell and value columns (__g*, __a*)."""
    base = _flat(row)
    flats = [_flat(v.tree) if v.tree is not None else None for v in neighbours] if base is not None else []
    if base is not None and all(f is not None and f.args["from_"].sql(dialect=DIALECT) ==
                                base.args["from_"].sql(dialect=DIALECT) for f in flats):
        return _influence_flat(base, flats, columns, person_unique=person_unique)
    return _influence_general(row.sql(dialect=DIALECT), neighbours, columns)


def _influence_flat(base: exp.Select, flats: list[exp.Select], columns: list[str], *,
                    person_unique: bool) -> str:
    """All neighbours in one scan: a row differs if its inclusion differs, or it is
    included by both with different cell or value columns."""
    cond0, proj0 = _parts(base)
    changed = []
    for f in flats:
        cond, proj = _parts(f)
        terms = []
        if cond != cond0:
            terms.append(f"({cond0}) <> ({cond})")
        differs = [f"({proj0[c]}) IS DISTINCT FROM ({proj[c]})" for c in columns if proj0[c] != proj[c]]
        if differs:
            terms.append(f"(({cond0}) AND ({' OR '.join(differs)}))")
        changed.append(" OR ".join(terms) if terms else "FALSE")
    source = base.args["from_"].sql(dialect=DIALECT)
    pid, rkey = proj0[PID], proj0[RKEY]
    if person_unique:
        select = [f"COUNT(*) FILTER (WHERE {cond0}) AS __n",
                  f"{cell_key_sql(f'COALESCE(SUM({rkey}) FILTER (WHERE {cond0}), 0)')} AS __ck"]
        for i, d in enumerate(changed):
            select.append(f"COUNT(*) FILTER (WHERE {d}) AS __n{i}")
            select.append(f"{cell_key_sql(f'COALESCE(SUM({rkey}) FILTER (WHERE {d}), 0)')} AS __ck{i}")
        return f"SELECT {', '.join(select)} {source}"
    inner = [f"{pid} AS __p", f"SUM(DISTINCT {rkey}) AS __k",
             f"bool_or({cond0}) AS __in", f"SUM(DISTINCT {rkey}) FILTER (WHERE {cond0}) AS __kin"] + \
        [f"bool_or({d}) AS __d{i}" for i, d in enumerate(changed)]
    outer = ["COUNT(*) FILTER (WHERE __in) AS __n",
             f"{cell_key_sql('COALESCE(SUM(__kin) FILTER (WHERE __in), 0)')} AS __ck"]
    for i in range(len(changed)):
        outer.append(f"COUNT(*) FILTER (WHERE __d{i}) AS __n{i}")
        outer.append(f"{cell_key_sql(f'COALESCE(SUM(__k) FILTER (WHERE __d{i}), 0)')} AS __ck{i}")
    return f"SELECT {', '.join(outer)} FROM (SELECT {', '.join(inner)} {source} GROUP BY {pid}) AS __pp"


def _influence_general(row_sql: str, neighbours: list[Variant], columns: list[str]) -> str:
    """Any row SELECT (joins, unit scopes, ...): compare each contributor's rows as a
    multiset of (cell, values) between the query and each neighbour."""
    cols = ", ".join([_q(PID), _q(RKEY), *(_q(c) for c in columns)])

    def rows(sql: str) -> str:
        return f"SELECT {cols}, COUNT(*) AS __m FROM ({sql}) AS __r GROUP BY ALL"

    ctes = [f"__s AS ({rows(row_sql)})",
            f"__base AS (SELECT {_q(PID)}, SUM(DISTINCT {_q(RKEY)}) AS __k FROM __s GROUP BY {_q(PID)})"]
    select = ["(SELECT COUNT(*) FROM __base) AS __n",
              f"(SELECT {cell_key_sql('COALESCE(SUM(__k), 0)')} FROM __base) AS __ck"]
    for i, v in enumerate(neighbours):
        ctes.append(f"__s{i} AS ({rows(v.sql)})")
        ctes.append(f"__d{i} AS (SELECT {_q(PID)}, SUM(DISTINCT {_q(RKEY)}) AS __k FROM "
                    f"((SELECT * FROM __s EXCEPT SELECT * FROM __s{i}) UNION ALL "
                    f"(SELECT * FROM __s{i} EXCEPT SELECT * FROM __s)) AS __x GROUP BY {_q(PID)})")
        select.append(f"(SELECT COUNT(*) FROM __d{i}) AS __n{i}")
        select.append(f"(SELECT {cell_key_sql('COALESCE(SUM(__k), 0)')} FROM __d{i}) AS __ck{i}")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(select)}"
