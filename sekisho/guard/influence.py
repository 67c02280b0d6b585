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

from dataclasses import dataclass

from sqlglot import exp
from sqlglot.optimizer.merge_subqueries import merge_subqueries
from sqlglot.optimizer.pushdown_projections import pushdown_projections

from sekisho.guard.analyze import DIALECT
from sekisho.guard.errors import QueryRefused
from sekisho.guard.protect.cellkey import cell_key_sql

PID, RKEY = "__pid", "__rkey"
CONNECTIVES = (exp.And, exp.Or, exp.Not, exp.Paren, exp.Xor)


@dataclass(frozen=True)
class Variant:
    atom: str        # the atom as SQL (named in notes and refusals)
    index: int       # position of the atom's node in the row tree's walk order
    action: str      # "true", "false", "drop:<j>" (IN element), "low" / "high" (BETWEEN bound := TRUE)
    sql: str         # the row-level SELECT with this one replacement


def _is_structural(node: exp.Expression, identifiers: frozenset[str]) -> bool:
    """A condition on an identifier (privacy unit, linkage key, __pid) is the guard's own
    (e.g. a unit scope's ``NOT household_id IS NULL``): the analysis refuses identifiers in
    an analyst's conditions, so such an atom cannot come from the query text."""
    return any(col.name in identifiers for col in node.find_all(exp.Column))


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


def _parse(row_sql: str) -> exp.Expression:
    """The row SELECT without the derived tables' unused columns (sqlglot's
    pushdown_projections: a condition in a column nobody reads cannot change the answer,
    and would only be "left out" for nothing) and with simple CASEs made searched."""
    from sqlglot import parse_one

    tree = parse_one(row_sql, dialect=DIALECT)
    try:
        tree = pushdown_projections(tree.copy())
    except Exception:  # pruning is an optimisation: without it every condition is still checked
        tree = parse_one(row_sql, dialect=DIALECT)
    return tree.transform(_searched_case)


def _replacement(node: exp.Expression, actions: set[str]) -> exp.Expression:
    """What ``node`` becomes when the given neighbour replacements are all applied."""
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


def apply(row_sql: str, chosen: list[Variant]) -> str:
    """``row_sql`` with all ``chosen`` replacements applied (indices refer to ``row_sql``
    as returned by ``neighbourhood``)."""
    tree = _parse(row_sql)
    nodes = list(tree.walk())
    by_node: dict[int, set[str]] = {}
    for v in chosen:
        by_node.setdefault(v.index, set()).add(v.action)
    for index, actions in by_node.items():
        node = nodes[index]
        new = _replacement(node, actions)
        if node is tree:
            return new.sql(dialect=DIALECT)
        node.replace(new)
    return tree.sql(dialect=DIALECT)


MAX_ATOMS = 64   # more leaf conditions than this: refused as too complex (each costs neighbours)


def neighbourhood(row_sql: str, identifiers: frozenset[str] = frozenset()) -> tuple[str, list[Variant]]:
    """The row-level SELECT (simple CASEs written as searched ones) and its neighbours:
    each atom replaced by TRUE and by FALSE (an IN element dropped; a BETWEEN bound
    dropped)."""
    # indices refer to the tree parsed from ``original``, as ``apply`` will parse it
    original = _parse(row_sql).sql(dialect=DIALECT)
    tree = _parse(original)
    nodes = list(tree.walk())
    position = {id(node): i for i, node in enumerate(nodes)}
    out: dict[str, Variant] = {}

    def add(atom_sql: str, index: int, action: str) -> None:
        # what ``apply(original, [variant])`` gives, without parsing ``original`` again:
        # the replacement is put in place, the tree written, and the node put back
        node = nodes[index]
        new = _replacement(node, {action})
        if node is tree:
            sql = new.sql(dialect=DIALECT)
        else:
            node.replace(new)
            sql = tree.sql(dialect=DIALECT)
            new.replace(node)
        if sql != original and sql not in out:
            out[sql] = Variant(atom=atom_sql, index=index, action=action, sql=sql)

    found = atoms(tree, identifiers)
    weight = sum(len(a.expressions) + 1 if isinstance(a, exp.In) else 1 for a in found)
    if weight > MAX_ATOMS:
        raise QueryRefused("too_complex", part=f"{weight} conditions (at most {MAX_ATOMS})")
    for atom in found:
        i = position[id(atom)]
        label = atom.sql(dialect=DIALECT)
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
    return original, list(out.values())


def closest(small: list[tuple[Variant, int]]) -> list[Variant]:
    """The one neighbour (given with its perturbed count) closest to the query (ties: first
    condition in the query); for an IN element, every element changing fewer than k goes
    with it (elements are disjoint values, so their effects simply add up)."""
    ranked = sorted(small, key=lambda o: (o[1], o[0].index, o[0].action))
    best = ranked[0][0]
    if best.action.startswith("drop:"):
        return [v for v, _ in ranked if v.index == best.index and v.action.startswith("drop:")]
    return [best]


def batch(small: list[tuple[Variant, int]]) -> list[Variant]:
    """Every condition changing fewer than k at once: per condition its closest neighbour
    (all small elements of an IN list). Overlapping conditions (``a OR b`` with both
    redundant) can together change far more than each alone, so the caller checks the
    batch and falls back to ``closest``."""
    by_node: dict[int, list[tuple[Variant, int]]] = {}
    for variant, value in small:
        by_node.setdefault(variant.index, []).append((variant, value))
    chosen = []
    for options in by_node.values():
        chosen += closest(options)
    return chosen


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


# ---- counting the contributors a neighbour changes --------------------------------------------
def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _flat(sql: str) -> exp.Select | None:
    """The row SELECT merged into one SELECT over one table, or None."""
    from sqlglot import parse_one

    try:
        tree = merge_subqueries(parse_one(sql, dialect=DIALECT))
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


def is_flat(row_sql: str) -> bool:
    """Whether the neighbours of ``row_sql`` can all be counted in one scan."""
    return _flat(row_sql) is not None


def influence_sql(row_sql: str, neighbours: list[Variant], columns: list[str], *,
                  person_unique: bool) -> str:
    """One SQL returning ``__n<i>`` (contributors changed by neighbour i) and ``__ck<i>``
    (their cell key), and ``__n``/``__ck`` for the contributors the query itself selects.
    ``columns``: the row SELECT's cell and value columns (__g*, __a*)."""
    base = _flat(row_sql)
    flats = [_flat(v.sql) for v in neighbours] if base is not None else []
    if base is not None and all(f is not None and f.args["from_"].sql(dialect=DIALECT) ==
                                base.args["from_"].sql(dialect=DIALECT) for f in flats):
        return _influence_flat(base, flats, columns, person_unique=person_unique)
    return _influence_general(row_sql, neighbours, columns)


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
