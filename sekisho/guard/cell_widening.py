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

In two tiers, as the query-wide rule decides: the neighbours that change c by at most
k-1-D (exact; small whatever the noise) first, and where applying them changes anybody
anywhere, c's other neighbours are decided again on the query with them applied (the
counts of each distinct first tier's query, ``CellWorlds.second``: in one statement for
all of a query's tiers over one unit scope, a scan each otherwise). Decided on the query as
asked, a near-k neighbour is decided by the person a certain one isolates: ``WHERE age <>
a`` by 町丁目 x sex x ``age >= 40`` — the key's neighbours (everyone moved to one side)
change the target's side by its count without her where she is and by the count asked
without the condition where she is not, so her sex's cells moved and the other sex's never
did (41 of 41 guesses right on 6 test cities; 1 guess in 432 targets with the tiers).

A cell whose S_c is not empty has the status ``widened`` (``cell_splice.mark``): S_c holds the
neighbours that change it by none as well, so the mark does not tell 0 from 1 (marking
only the cells answered differently would). A count's interval is widened by what S_c can
change, so the count asked for lies in it; where the cell's world lies further from the
cell asked for than that (conditions that move nobody there alone and many together: a
CASE's branch tests made FALSE beside a later branch's made TRUE), the cell is suppressed
(``cell_splice._beyond_interval``, decided on perturbed counts). A neighbour replacing a comparison of a
group-key column with constants cannot change cells of other keys whatever the data
(``untouched_cells``): it is not in their S_c, so ordinary filters on the grouped column
leave those cells as asked and unmarked — unless S_c holds a neighbour of a condition
inside a group key (``movers``), which brings rows of other key values into the cell.

Cost: where what S_c applies changes nobody in c — one neighbour that changes nobody
there, or dropped elements of one IN list that each change nobody — the cell is computed
as the query's own; other cells from one more cells statement per distinct S_c
(``MAX_WORLDS``, the smallest first; beyond that the remaining cells are suppressed),
kept with the verdicts for a repeated query.

Decisions are on counts perturbed from a table of their own (``decision_counts``): on the
release's noise, ``COUNT(*) FILTER (WHERE age <> a)`` made FALSE changes the cell by all it
counts — the whole released cell where the target is not, so that decision was known from
the released count, and a fresh draw where she is (a cell released at k or more and then
answered otherwise was hers, 50 times out of 50 on 8 test cities; 53 of 96 with the table).

Residual risk: decisions are on perturbed counts, so a neighbour changing c by exactly k-1
others plus the target is in S_c more often than one changing k-1 — the near-k tier the
query-wide rule also has; the noise is bounded (±D), so a cell changed by k+D is never
decided small and one changed by k+D-1 is, now and then (7% at D=5): such a rare decision
names the target's cell; two tiers only (the second tier's near-k neighbours are decided
together, not one per round); first tiers and S_c beyond ``MAX_WORLDS`` are suppressed,
and which fall beyond depends on which are distinct (first tiers by exact counts up to
k-1-D, S_c decided near k).
"""

from __future__ import annotations

import numpy as np
from sqlglot import exp

from sekisho.guard import enumerated_keys, hidden
from sekisho.guard.neighbours import Variant, apply, batch
from sekisho.guard.protect.cellkey import KEY_RANGE, PerturbationTable
from sekisho.guard.cell_splice import OWN, Resolution
from sekisho.guard.protect.threshold import Cells, number
from sekisho.guard.sqltext import DIALECT

MAX_WORLDS = 8   # distinct queries cells are answered as, beyond the query's own
WHICH = "__w"


def cell_worlds(counts: Cells, groups: list[str], ptable: PerturbationTable, k: int, base: exp.Expression,
                neighbours: list[Variant], keep: list[int], catalog=None, fetch=None,
                recount=None) -> "CellWorlds":
    """From ``cell_influence_sql``'s counts: which neighbours change which cell, and by k or
    more (perturbed); the query each cell is answered as is resolved per cell (``resolve``).
    With the ``catalog`` and ``fetch``, also the cells a neighbour cannot change by the
    public domains of what it and the keys read (``enumerated_keys``). ``recount(tree,
    fetch)``: these decisions for other row trees, a list for a list (the second tiers,
    ``CellWorlds.second``)."""
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
    noisy = ptable.decision_counts([t[1] for _, t in items], [t[0] for _, t in items]).tolist() if items else []
    large: dict[tuple, frozenset[int]] = {}
    changed: dict[tuple, frozenset[int]] = {}
    for ((w, key), _), value in zip(items, noisy):
        changed[key] = changed.get(key, frozenset()) | {w}
        if value >= k:
            large[key] = large.get(key, frozenset()) | {w}
    untouched = untouched_cells(base, neighbours)
    if fetch is not None and changed:
        by_grid = enumerated_keys.untouched(base, neighbours, keep, catalog, fetch)
        for i, test in by_grid.items():
            by_text = untouched.get(i)
            untouched[i] = test if by_text is None else \
                (lambda key, a=by_text, b=test: a(key) or b(key))
    exact = {(w, key): t[0] for (w, key), t in items}
    return CellWorlds(base, neighbours, frozenset(keep), changed, large, untouched, exact=exact,
                      certain=k - 1 - ptable.max_noise, recount=recount)


class CellWorlds:
    """The per-cell rule's decisions for one boundary, kept with the verdict: the query's
    tree and neighbours, the kept neighbours, per cell those that change it and those that
    change it by k or more, and the neighbours that cannot change some cells whatever the
    data (``untouched_cells``)."""

    def __init__(self, base, neighbours, kept, changed, large, untouched, *, exact=None, certain: int = 0,
                 recount=None):
        self.base, self.neighbours, self.kept = base, neighbours, kept
        self.changed, self.large, self.untouched = changed, large, untouched
        self.exact, self.certain, self.recount = exact or {}, certain, recount
        self._resolved = None   # (cell keys, their resolution): the last one, reused when asked again
        self._position = {id(v): i for i, v in enumerate(neighbours)}
        self._chosen_of: dict[frozenset, frozenset] = {}   # many cells share one S_c
        # neighbours that change somebody somewhere, and the second tier's decisions per
        # world of certain ones (``second``), computed when a release first needs them
        self._moving = frozenset().union(*changed.values()) if changed else frozenset()
        self._second: dict[frozenset, "CellWorlds | None"] = {}
        self._movers = None

    def applied(self, key) -> frozenset[int]:
        """S_c: the kept neighbours that change the cell by fewer than k — those that change
        it by none included (so S_c does not tell 0 from 1), but not those that cannot
        change it whatever the data."""
        applied = self.kept - self.large.get(key, frozenset())
        if not self.untouched or applied & self.movers():
            # a neighbour of a group key's condition moves rows between cells: applied
            # with it, a condition no row of this cell can meet may meet the rows it
            # brings (``WHERE age <> a`` by ``age >= 40``: everyone moved to the FALSE
            # side brings the target of age a there, whom the condition left out)
            return applied
        return frozenset(i for i in applied if not (i in self.untouched and self.untouched[i](key)))

    def movers(self) -> frozenset[int]:
        """The neighbours of conditions inside a group key (they move rows between cells)."""
        if self._movers is None:
            inside = set()
            if isinstance(self.base, exp.Select):
                for p in self.base.expressions:
                    if isinstance(p, exp.Alias) and p.alias.startswith(hidden.GROUP_KEY_PREFIX):
                        inside.update(id(n) for n in p.walk())
            nodes = list(self.base.walk()) if inside else []
            self._movers = frozenset(i for i, v in enumerate(self.neighbours)
                                     if 0 <= v.index < len(nodes) and id(nodes[v.index]) in inside)
        return self._movers

    def own(self, key, applied: frozenset[int]) -> bool:
        """Whether what ``applied`` applies changes nobody in the cell: nothing, one
        neighbour that changes nobody there, or dropped elements of one IN list that each
        change nobody (disjoint values: together they change what each changes, added up)."""
        if not applied:
            return True
        chosen = self._chosen(applied)
        if chosen & self.changed.get(key, frozenset()):
            return False
        variants = [self.neighbours[i] for i in chosen]
        return len(variants) == 1 or (len({v.index for v in variants}) == 1
                                      and all(v.action.startswith("drop:") for v in variants))

    def first(self, key, applied: frozenset[int]) -> frozenset[int]:
        """The first tier of S_c: the neighbours that change the cell by at most k-1-D
        (exact count, D the noise bound) — fewer than k whatever the noise, zero included."""
        return frozenset(i for i in applied if self.exact.get((i, key), 0) <= self.certain)

    def second(self, chosen: frozenset[int], fetch) -> "CellWorlds | None":
        """The decisions for the query with the first tier's ``chosen`` neighbours applied
        (one more counting scan, kept here; None beyond ``MAX_WORLDS`` of them)."""
        if chosen not in self._second:
            if len(self._second) >= MAX_WORLDS:
                return None
            self._count_seconds([chosen], fetch)
        return self._second[chosen]

    def _count_seconds(self, chosens: list[frozenset[int]], fetch) -> None:
        """The second tiers of ``chosens`` not counted yet, as many as ``MAX_WORLDS``
        leaves room for (in the order given), counted together (``recount``: one statement
        for trees over one unit scope)."""
        missing = [c for c in chosens if c not in self._second][:max(0, MAX_WORLDS - len(self._second))]
        if missing:
            trees = [apply(self.base, [self.neighbours[i] for i in sorted(c)]) for c in missing]
            for chosen, worlds in zip(missing, self.recount(trees, fetch)):
                self._second[chosen] = worlds

    def second_tiers(self) -> int:
        return len(self._second)

    def resolve(self, keys, fetch=None) -> "Resolution":
        """Per cell of ``keys``: its S_c and the row SQL it is answered as (``OWN``: the
        query's own; None: beyond ``MAX_WORLDS``, suppressed). The worlds computed are the
        smallest first, so the same whatever order the cells come in. Where the cell's
        first tier (``first``) changes somebody somewhere, its other neighbours are
        decided on the query with that tier applied (``second``; ``fetch`` runs the
        counting scan) — see the module's two tiers. So is a cell where that tier changes
        nobody: all cells alike. Taking only the cells it changes left the others to the
        first round, where the FILTER's FALSE neighbour (consumed by the tier in the
        target's cell) was still decided near k: every guess then wrong, 0 of 55."""
        cells = frozenset(keys)   # (the engine returns the cells in any order)
        if self._resolved is not None and self._resolved[0] == cells:
            return self._resolved[1]   # the same query again on the same snapshot: the same cells
        applied = {key: self.applied(key) for key in keys}
        plans: dict = {}   # key -> the neighbours applied (indices of ours), OWN, or None: suppressed
        sizes = {}
        firsts: dict[frozenset, list] = {}
        if self.recount is not None and fetch is not None:
            for key, a in applied.items():
                tier = self.first(key, a)
                chosen = self._chosen(tier) if tier else frozenset()
                if chosen & self._moving:
                    firsts.setdefault(chosen, []).append((key, tier))
        ordered = sorted(firsts, key=lambda c: (len(c), sorted(c)))
        if ordered:
            self._count_seconds(ordered, fetch)
        for chosen in ordered:
            later = self.second(chosen, fetch)
            for key, tier in firsts[chosen]:
                rest = later.applied(key) if later is not None else frozenset()
                sizes[key] = len(tier) + len(rest)
                if later is None:
                    plans[key] = None   # beyond MAX_WORLDS first tiers: suppressed
                elif self.own(key, tier) and later.own(key, rest):
                    plans[key] = OWN
                else:
                    plans[key] = self._as_ours(chosen, later, rest)
        for key, a in applied.items():
            if key not in plans:
                sizes[key] = len(a)
                plans[key] = OWN if self.own(key, a) else a
        ranked = sorted({a for a in plans.values() if isinstance(a, frozenset)},
                        key=lambda a: (len(a), sorted(a)))[:MAX_WORLDS]
        sql_of = {a: apply(self.base, [self.neighbours[i] for i in sorted(self._chosen(a))]).sql(dialect=DIALECT)
                  for a in ranked}
        resolution = Resolution({key: OWN if a == OWN else sql_of.get(a) if a is not None else None
                                 for key, a in plans.items()}, sizes)
        self._resolved = (cells, resolution)
        return resolution

    def _as_ours(self, chosen: frozenset[int], later: "CellWorlds", rest: frozenset[int]) -> frozenset[int] | None:
        """``chosen`` with the second tier's ``rest`` (neighbours of the query with
        ``chosen`` applied) named as our neighbours of the same atoms and actions, so one
        world is one set whichever way it was reached (None: not found, suppressed)."""
        replaced = {self.neighbours[i].index for i in chosen}
        ours: dict[tuple[str, str], list[int]] = {}
        for i, v in sorted(enumerate(self.neighbours), key=lambda iv: iv[1].index):
            if v.index not in replaced:
                ours.setdefault((v.atom, v.action), []).append(i)
        theirs: dict[tuple[str, str], list[int]] = {}
        for j, v in sorted(enumerate(later.neighbours), key=lambda jv: jv[1].index):
            theirs.setdefault((v.atom, v.action), []).append(j)
        out = set(chosen)
        for j in later._chosen(rest) if rest else ():
            v = later.neighbours[j]
            same, mine = theirs[(v.atom, v.action)], ours.get((v.atom, v.action), [])
            if len(same) != len(mine):
                return None
            out.add(mine[same.index(j)])
        return frozenset(out)

    def _chosen(self, applied: frozenset[int]) -> frozenset[int]:
        # per condition its preferred way when several of its neighbours apply
        if applied not in self._chosen_of:
            self._chosen_of[applied] = frozenset(
                self._position[id(v)] for v in batch([(self.neighbours[i], 0) for i in sorted(applied)]))
        return self._chosen_of[applied]

    def _base_length(self) -> int:
        # rendered once: the cache accounts a verdict again each time a second tier is counted
        if getattr(self, "_base_sql_length", None) is None:
            self._base_sql_length = len(self.base.sql(dialect=DIALECT)) if self.base is not None else 0
        return self._base_sql_length

    def nbytes(self) -> int:
        # (with room for one resolution: a world's SQL and a few entries per cell; and the
        # second tiers computed so far, ``VerdictCache.account``)
        return 2000 + 300 * len(self.neighbours) + 200 * (len(self.changed) + len(self.large)) + \
            100 * len(self.exact) + \
            8 * MAX_WORLDS * self._base_length() + \
            sum(w.nbytes() for w in list(self._second.values()) if w is not None)

    def __bool__(self) -> bool:
        return bool(self.kept)


NONE = CellWorlds(None, [], frozenset(), {}, {}, {})


def untouched_cells(base: exp.Expression, neighbours: list[Variant]) -> dict:
    """Per neighbour replacing a comparison of a group-key column with constants (``block
    IN (...)``, ``age >= 18``, ``sex = '女'`` where the query groups by that column): a test
    of a cell's key telling that the neighbour cannot change that cell whatever the data —
    it changes only rows whose value makes the comparison differ from its replacement,
    and those rows are in other cells. Decided from the text and the key, never the data."""
    if not isinstance(base, exp.Select):
        return {}
    keys = {}
    for p in base.expressions:
        if isinstance(p, exp.Alias) and p.alias.startswith(hidden.GROUP_KEY_PREFIX) and isinstance(p.this, exp.Column):
            keys[(p.this.table, p.this.name)] = int(p.alias[len(hidden.GROUP_KEY_PREFIX):])
    if not keys:
        return {}
    nodes = list(base.walk())
    out = {}
    for i, v in enumerate(neighbours):
        node = nodes[v.index] if 0 <= v.index < len(nodes) else None
        column = node.this if node is not None else None
        if not isinstance(column, exp.Column) or (column.table, column.name) not in keys:
            continue
        changes = _changes(node, v.action)
        kinds = {_kind(e) for e in [node.expression] + list(node.expressions) + [node.args.get("low"),
                                                                                   node.args.get("high")]
                 if isinstance(e, exp.Literal)}
        if changes is not None and len(kinds) == 1:
            j = keys[(column.table, column.name)]
            out[i] = lambda key, j=j, changes=changes, kind=kinds.pop(): _known(changes, key[j], kind) is False
    return out


def _literal(node: exp.Expression):
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        try:
            return float(node.this)
        except ValueError:
            return None
    return None


def _changes(node: exp.Expression, action: str):
    """A function of a column value: whether the neighbour can change a row with that value
    (None: unknown), or None when the comparison is not one of a column with constants."""
    ops = {exp.EQ: lambda x, c: x == c, exp.NEQ: lambda x, c: x != c, exp.GT: lambda x, c: x > c,
           exp.GTE: lambda x, c: x >= c, exp.LT: lambda x, c: x < c, exp.LTE: lambda x, c: x <= c}
    if type(node) in ops:
        c = _literal(node.expression)
        if c is None:
            return None
        test = ops[type(node)]
        atom = lambda x: test(x, c)   # noqa: E731
    elif isinstance(node, exp.In) and node.expressions and not node.args.get("query"):
        values = [_literal(e) for e in node.expressions]
        if any(v is None for v in values):
            return None
        if action.startswith("drop:"):
            dropped = values[int(action.split(":", 1)[1])]
            return lambda x: x == dropped
        atom = lambda x: x in values   # noqa: E731
    elif isinstance(node, exp.Between):
        low, high = _literal(node.args.get("low")), _literal(node.args.get("high"))
        if low is None or high is None:
            return None
        if action == "low":
            return lambda x: x < low
        if action == "high":
            return lambda x: x > high
        atom = lambda x: low <= x <= high   # noqa: E731
    else:
        return None
    if action not in ("true", "false"):
        return None
    replacement = action == "true"
    return lambda x: atom(x) != replacement


def _kind(literal: exp.Literal) -> str:
    return "text" if literal.is_string else "number"


def _known(changes, value, kind: str):
    """``changes(value)``, or None when the value is NULL (the comparison is NULL, which a
    replacement may change) or not of the constants' kind (text with text, numbers with
    numbers: other pairs compare after a cast this does not model)."""
    if kind == "text" and isinstance(value, str):
        return bool(changes(value))
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return bool(changes(float(value)))
    return None
