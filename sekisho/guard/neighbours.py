"""The neighbours of a row-level SELECT for the condition-influence rule
(``sekisho.guard.influence``): its *atoms* (leaf conditions) and, for each, the queries
an analyst could ask instead — the atom replaced by TRUE and by FALSE, an IN element
dropped, a BETWEEN bound dropped.

Pure functions over ``sqlglot`` trees: nothing here parses SQL. A neighbour is the row
tree with one node replaced: a ``Variant`` keeps the node's position and its
replacement, so the one-scan counts render only the part of the query that changed
(``influence``); ``apply`` builds the whole neighbour when one is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp
from sqlglot.optimizer.merge_subqueries import merge_subqueries
from sqlglot.optimizer.pushdown_projections import pushdown_projections

from sekisho.guard.sqltext import DIALECT
from sekisho.guard.errors import QueryRefused
from sekisho.guard.hidden import PID
from sekisho.guard.joins import EXISTENCE, STRUCTURAL

CONNECTIVES = (exp.And, exp.Or, exp.Not, exp.Paren, exp.Xor)


@dataclass(frozen=True)
class Variant:
    atom: str        # the atom as SQL (named in notes and refusals)
    index: int       # position of the atom's node in the row tree's walk order
    action: str      # "true", "false", "drop:<j>" (IN element), "low" / "high" (BETWEEN bound := TRUE)
    sql: str | None = None   # the row-level SELECT with this replacement, when rendered
    tree: exp.Expression | None = field(default=None, compare=False, repr=False)   # ... as a tree, when built
    replacement: exp.Expression | None = field(default=None, compare=False, repr=False)   # the new node


def _is_structural(node: exp.Expression, identifiers: frozenset[str]) -> bool:
    """A condition on an identifier (privacy unit, linkage key, __pid) is the guard's own
    (e.g. a unit scope's ``NOT household_id IS NULL``): the analysis refuses identifiers in
    an analyst's conditions, so such an atom cannot come from the query text. So is a
    condition the guard marked as structure (``joins.STRUCTURAL``), whatever its names."""
    if node.meta.get(STRUCTURAL) or any(a.meta.get(STRUCTURAL) for a in _ancestors(node)):
        return True
    return any(col.name in identifiers for col in node.find_all(exp.Column))


def _ancestors(node: exp.Expression):
    parent = node.parent
    while parent is not None and not isinstance(parent, (exp.Select, exp.Join)):
        yield parent
        parent = parent.parent


def _existence_label(join: exp.Join) -> str:
    """How a join whose existence is a condition is named in notes and refusals."""
    kind = (join.kind or "").upper()
    target = join.this.sql(dialect=DIALECT)
    if kind == "ANTI":
        return f"NOT EXISTS ({target})"
    if kind == "SEMI":
        return f"EXISTS ({target})"
    return f"JOIN {target}"


def _existence(join: exp.Join, holds: bool) -> exp.Join:
    """A key join with its existence condition replaced: TRUE keeps every row of the left
    side (an INNER join becomes LEFT; a SEMI/ANTI join becomes ``ANTI JOIN ... ON FALSE``,
    which removes no row); FALSE keeps none (``ON FALSE`` of an INNER/SEMI join)."""
    new = join.copy()
    new.meta.pop(EXISTENCE, None)
    kind = (join.kind or "").upper()
    if holds:
        if kind in ("SEMI", "ANTI"):
            new.set("kind", "ANTI")
            new.set("on", _false())
        else:
            new.set("side", "LEFT")
            new.set("kind", None)
    else:
        new.set("kind", "SEMI" if kind in ("SEMI", "ANTI") else None)
        new.set("side", None)
        new.set("on", _false())
    return new


def _condition_slot(node: exp.Expression) -> bool:
    """``node`` sits where a condition is expected (its value decides rows or branches)."""
    parent = node.parent
    if parent is None:
        return False
    if isinstance(parent, exp.Paren):
        return _condition_slot(parent)   # parentheses take the place of what they hold
    if isinstance(parent, CONNECTIVES):
        return True
    if isinstance(parent, (exp.Where, exp.Having)):
        return True
    if isinstance(parent, exp.Join) and node.arg_key == "on":
        return True
    if isinstance(parent, exp.If) and node.arg_key == "this":
        return True
    return False


def _equi_join_key(node: exp.Expression) -> bool:
    """``a.x = b.y`` between two sources in an ON clause: the join's structure, not a filter."""
    if not isinstance(node, exp.EQ):
        return False
    left, right = node.this, node.expression
    if not (isinstance(left, exp.Column) and isinstance(right, exp.Column)) or left.table == right.table:
        return False
    return node.find_ancestor(exp.Join) is not None


def atoms(tree: exp.Expression, identifiers: frozenset[str] = frozenset()) -> list[exp.Expression]:
    """The leaf conditions of ``tree`` in a stable (walk) order."""
    found = []
    identifiers = identifiers | {PID}
    for node in tree.walk():
        if isinstance(node, exp.Join):
            if node.meta.get(EXISTENCE):
                found.append(node)   # "the person has a row in the joined view": a condition
            continue
        if isinstance(node, (*CONNECTIVES, exp.Boolean)) or (isinstance(node, exp.Predicate) or
                                                              _condition_slot(node)) \
                and _is_structural(node, identifiers):
            continue   # TRUE/FALSE: a condition already replaced (or written so by the analyst)
        if isinstance(node, exp.Predicate):
            inside = node.parent
            while isinstance(inside, CONNECTIVES):
                inside = inside.parent
            if isinstance(inside, exp.Predicate):
                continue  # a predicate nested in a predicate, e.g. (a > 1) = TRUE: the outer one is the atom
            if _equi_join_key(node):
                continue
            found.append(node)
        elif _condition_slot(node) and not isinstance(node, exp.Select):
            found.append(node)   # a boolean column or function used as a condition
    return found


def _true() -> exp.Expression:
    return exp.Boolean(this=True)


def _false() -> exp.Expression:
    return exp.Boolean(this=False)


def prepare(row: exp.Expression) -> exp.Expression:
    """A copy of the row SELECT without the derived tables' unused columns (sqlglot's
    pushdown_projections: a condition in a column nobody reads cannot change the answer,
    and would only be "left out" for nothing), merged into one SELECT over one table when
    that keeps every condition one node (``_merged``), and with simple CASEs made
    searched."""
    try:
        tree = pushdown_projections(row.copy())
    except Exception:  # pruning is an optimisation: without it every condition is still checked
        tree = row.copy()
    return _merged(tree).transform(_searched_case)


def _merged(tree: exp.Expression) -> exp.Expression:
    """``tree`` with its derived tables merged (sqlglot's merge_subqueries) when the result
    is one SELECT over one table and holds exactly the conditions ``tree`` holds: a derived
    column read twice above would copy its conditions, and replacing one copy is not the
    neighbour the analyst could ask. Merged, the neighbours are counted in one scan with
    each condition computed once per row (``neighbour_counts``)."""
    if not isinstance(tree, exp.Select) or sum(1 for _ in tree.find_all(exp.Select)) == 1:
        return tree
    try:
        merged = merge_subqueries(tree.copy())
    except Exception:
        return tree
    if not isinstance(merged, exp.Select) or sum(1 for _ in merged.find_all(exp.Select)) != 1 \
            or any(merged.args.get(a) for a in ("joins", "group", "having", "distinct", "with_")) \
            or not isinstance(merged.args.get("from_") and merged.args["from_"].this, exp.Table):
        return tree
    if len(atoms(merged)) != len(atoms(tree)):
        return tree
    return merged


def _replacement(node: exp.Expression, actions: set[str]) -> exp.Expression:
    """What ``node`` becomes when the given neighbour replacements are all applied."""
    if isinstance(node, exp.Join):
        return _existence(node, "false" not in actions)
    if "true" in actions:
        return _true()
    if "false" in actions:
        return _false()
    if isinstance(node, exp.Between):
        if {"low", "high"} <= actions:
            return _true()
        if "low" in actions:      # the lower bound always holds: only the upper one is left
            return exp.LTE(this=node.this.copy(), expression=node.args["high"].copy())
        return exp.GTE(this=node.this.copy(), expression=node.args["low"].copy())
    dropped = {int(a.split(":", 1)[1]) for a in actions if a.startswith("drop:")}
    rest = [e.copy() for j, e in enumerate(node.expressions) if j not in dropped]
    return node.__class__(this=node.this.copy(), expressions=rest) if rest else _false()


def apply(base: exp.Expression, chosen: list[Variant]) -> exp.Expression:
    """A copy of ``base`` (the tree ``neighbourhood`` returned) with all ``chosen``
    replacements applied (a copy walks in the same order, so the indices hold)."""
    tree = base.copy()
    nodes = list(tree.walk())
    by_node: dict[int, set[str]] = {}
    for v in chosen:
        by_node.setdefault(v.index, set()).add(v.action)
    for index, actions in by_node.items():
        node = nodes[index]
        new = _replacement(node, actions)
        if node is tree:
            return new
        node.replace(new)
    return tree


MAX_ATOMS = 64   # more leaf conditions than this: refused as too complex (each costs neighbours)
# ... in a query over one unit scope, whose neighbours are all counted in one scan of the
# view (influence._influence_units): the households' 家族類型 takes 68
MAX_ATOMS_UNIT_SCOPE = 96


def neighbourhood(row: exp.Expression, identifiers: frozenset[str] = frozenset(), max_atoms: int = MAX_ATOMS,
                  *, render: bool = True) -> tuple[exp.Expression, str | None, list[Variant]]:
    """The row-level SELECT prepared (``prepare``), its SQL (None without ``render``: the
    one-scan counts render only the parts neighbours change), and its neighbours: each
    atom replaced by TRUE and by FALSE (an IN element dropped; a BETWEEN bound dropped).
    Variant indices refer to the returned tree, as ``apply`` expects."""
    tree = prepare(row)
    original = tree.sql(dialect=DIALECT) if render else None
    nodes = list(tree.walk())
    position = {id(node): i for i, node in enumerate(nodes)}
    out: dict[tuple[int, str], Variant] = {}

    def add(atom_sql: str, index: int, action: str) -> None:
        # one neighbour per distinct replacement of a node (an IN of one element dropped
        # is FALSE, as the atom replaced by FALSE); none that leaves the node as it is
        node = nodes[index]
        new = _replacement(node, {action})
        key = (index, new.sql(dialect=DIALECT))
        if key[1] != node.sql(dialect=DIALECT) and key not in out:
            out[key] = Variant(atom=atom_sql, index=index, action=action, replacement=new)

    found = atoms(tree, identifiers)
    weight = sum(len(a.expressions) + 1 if isinstance(a, exp.In) else 1 for a in found)
    if weight > max_atoms:
        raise QueryRefused("too_complex", part=f"{weight} conditions (at most {max_atoms})")
    for atom in found:
        i = position[id(atom)]
        label = _existence_label(atom) if isinstance(atom, exp.Join) else atom.sql(dialect=DIALECT)
        if isinstance(atom, exp.In) and atom.expressions and not atom.args.get("query"):
            # x IN (a, b, c) is a OR of equalities: each element is its own atom
            add(label, i, "true")
            for j, item in enumerate(atom.expressions):
                add(f"{atom.this.sql(dialect=DIALECT)} = {item.sql(dialect=DIALECT)}", i, f"drop:{j}")
        elif isinstance(atom, exp.Between):
            subject = atom.this.sql(dialect=DIALECT)
            add(f"{subject} >= {atom.args['low'].sql(dialect=DIALECT)}", i, "low")
            add(f"{subject} <= {atom.args['high'].sql(dialect=DIALECT)}", i, "high")
            add(label, i, "false")
        else:
            add(label, i, "true")
            add(label, i, "false")
    return tree, original, list(out.values())


def variant_tree(base: exp.Expression, variant: Variant) -> exp.Expression:
    """The whole neighbour as a tree (built once, kept on the variant's ``tree``)."""
    if variant.tree is None:
        object.__setattr__(variant, "tree", apply(base, [variant]))
    return variant.tree


def variant_sql(base: exp.Expression, variant: Variant) -> str:
    """The whole neighbour's SQL (rendered once, kept on the variant's ``sql``)."""
    if variant.sql is None:
        object.__setattr__(variant, "sql", variant_tree(base, variant).sql(dialect=DIALECT))
    return variant.sql


def _preference(variant: Variant) -> tuple[int, str]:
    """A fixed order between the neighbours of one condition: FALSE (never holds), an IN
    element dropped, TRUE (always holds), a BETWEEN bound dropped."""
    action = variant.action
    return (0 if action == "false" else 1 if action.startswith("drop:") else 2 if action == "true" else 3, action)


def closest(small: list[tuple[Variant, int]]) -> list[Variant]:
    """The condition (given its neighbours with their perturbed counts) closest to the
    query (ties: first condition in the query), left out its preferred way (``_preference``)
    — never the way its counts favour: when both its TRUE and FALSE neighbours are small, the
    one that changes nobody would tell which side a person is on (``WHERE (C AND age = 40 AND
    sex = '女') OR pad``: TRUE changes the target when a man, FALSE when a woman). For an IN
    element, every element changing fewer than k goes with it (elements are disjoint values,
    so their effects simply add up)."""
    ranked = sorted(small, key=lambda o: (o[1], o[0].index, o[0].action))
    node = ranked[0][0].index
    options = [v for v, _ in ranked if v.index == node]
    best = min(options, key=_preference)
    if best.action.startswith("drop:"):
        return [v for v in options if v.action.startswith("drop:")]
    return [best]


def batch(small: list[tuple[Variant, int]]) -> list[Variant]:
    """Several conditions at once: per condition its closest neighbour (all small elements
    of an IN list). Overlapping conditions (``a OR b`` with both redundant) can together
    change far more than each alone, so the caller checks the batch and falls back to
    ``closest``."""
    chosen = []
    for options in _by_condition(small):
        chosen += closest(options)
    return chosen


def _by_condition(small: list[tuple[Variant, int]]) -> list[list[tuple[Variant, int]]]:
    """The neighbours of each condition (node), in the order first met."""
    by_node: dict[int, list[tuple[Variant, int]]] = {}
    for variant, value in small:
        by_node.setdefault(variant.index, []).append((variant, value))
    return list(by_node.values())


def ranked_conditions(small: list[tuple[Variant, int]]) -> list[list[Variant]]:
    """Per condition its closest neighbour (all small elements of an IN list), as
    ``batch``, the conditions closest first (ties: first in the query) — the first is
    ``closest(small)``."""
    order = sorted(_by_condition(small), key=lambda options: min((o[1], o[0].index, o[0].action) for o in options))
    return [closest(options) for options in order]


def _searched_case(node: exp.Expression) -> exp.Expression:
    """``CASE x WHEN v THEN ...`` -> ``CASE WHEN x = v THEN ...``, so each branch has a
    condition that can be replaced (the two forms are equivalent)."""
    if isinstance(node, exp.Case) and node.this is not None:
        subject = node.this
        ifs = [exp.If(this=exp.EQ(this=subject.copy(), expression=branch.this.copy()),
                      true=branch.args["true"].copy()) for branch in node.args.get("ifs") or []]
        default = node.args.get("default")
        return exp.Case(ifs=ifs, default=default.copy() if default is not None else None)
    return node
