"""SQL that counts the contributors each neighbouring query changes, for the
condition-influence rule (``sekisho.guard.influence``).

One statement per round returns ``__n<i>``/``__ck<i>`` (contributors changed by
neighbour i and their cell key) and ``__n``/``__ck`` (the query's own contributors).
Three forms, chosen by the row SELECT's shape, agree on counts and cell keys
(tests/test_guard_influence.py): one scan of one table (``_influence_flat``), one scan
of the view under one household scope (``neighbour_units``), and, for other shapes
(joins, nested derived tables), a comparison of each neighbour's row set with the
query's (``_influence_general``). The one-scan forms render only the part of the query
a neighbour changes.
"""

from __future__ import annotations

import re

from sqlglot import exp
from sqlglot.tokens import Tokenizer, TokenType
from sqlglot.optimizer.merge_subqueries import merge_subqueries

from sekisho.guard.sqltext import DIALECT
from sekisho.guard.hidden import PID, RKEY
from sekisho.guard.neighbour_units import influence_units
from sekisho.guard.neighbours import Variant, variant_sql, variant_tree
from sekisho.guard.protect.cellkey import cell_key_sql
from sekisho.guard.unit_levels import fold


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
    return _cond(where.this if where is not None else None), {p.alias_or_name: p.this.sql(dialect=DIALECT) if isinstance(p, exp.Alias) else
                  p.sql(dialect=DIALECT) for p in select.expressions}


def unit_scope_shape(row: exp.Expression) -> tuple[exp.Select, exp.Select] | None:
    """(outer, unit scope) when ``row`` is a SELECT over one unit scope — a derived table
    ``SELECT <linkage key>, <features> FROM <view> [WHERE ...] GROUP BY <linkage key>``
    — or None."""
    if not isinstance(row, exp.Select) or any(row.args.get(a) for a in
                                              ("joins", "group", "having", "distinct", "with_")):
        return None
    from_ = row.args.get("from_")
    if from_ is None or not isinstance(from_.this, exp.Subquery) or not isinstance(from_.this.this, exp.Select):
        return None
    inner = from_.this.this
    group = inner.args.get("group")
    if any(inner.args.get(a) for a in ("joins", "having", "distinct", "with_", "order", "limit", "offset")) \
            or group is None or len(group.expressions) != 1 or not isinstance(inner.args["from_"].this, exp.Table):
        return None
    if sum(1 for _ in inner.find_all(exp.Select)) != 1 or sum(1 for _ in row.find_all(exp.Select)) != 2:
        return None
    return row, inner


def is_flat(row: exp.Expression) -> bool:
    """Whether the neighbours of ``row`` can all be counted in one scan."""
    return _flat(row) is not None or unit_scope_shape(row) is not None


def _simple(row: exp.Expression) -> bool:
    """One SELECT over one table, nothing to merge: its parts are its own."""
    return isinstance(row, exp.Select) and sum(1 for _ in row.find_all(exp.Select)) == 1 and \
        _flat(row) is not None


def _part_of(roots: dict[tuple, exp.Expression]) -> dict[int, tuple]:
    """id(node) -> the key of the part (a projection, a WHERE) it belongs to."""
    return {id(n): key for key, root in roots.items() for n in root.walk()}


def _local(variant: Variant, nodes: list[exp.Expression], part_of: dict[int, tuple]) -> tuple | None:
    """The part a variant changes, when it is one replacement at a known position."""
    if variant.index < 0 or variant.replacement is None or variant.tree is not None:
        return None
    return part_of.get(id(nodes[variant.index]))


def _cond(where: exp.Expression | None) -> str:
    """A WHERE as a condition that is never NULL, its TRUE/FALSE constants folded (a
    neighbour that replaces a top-level conjunct by FALSE selects nothing: ``FALSE``)."""
    if where is None:
        return "TRUE"
    folded = fold(where)
    if isinstance(folded, exp.Boolean):
        return "TRUE" if folded.this else "FALSE"
    return f"COALESCE(({folded.sql(dialect=DIALECT)}), FALSE)"


ATOM = re.compile(r"__atom\d+")


def _names(sql: str, alias: str) -> set[str] | None:
    """The columns of ``alias`` that guard-rendered ``sql`` reads (``"alias"."col"``), or
    None when it reads anything else: a name of another table, a bare or unqualified
    name that is not an atom (``__atom<j>``). Function names are not columns."""
    tokens = Tokenizer().tokenize(sql)
    out: set[str] = set()
    i = 0
    while i < len(tokens):
        t = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        if t.token_type == TokenType.IDENTIFIER and after is not None and after.token_type == TokenType.DOT:
            column = tokens[i + 2] if i + 2 < len(tokens) else None
            if t.text != alias or column is None or column.token_type != TokenType.IDENTIFIER:
                return None
            out.add(column.text)
            i += 3
            continue
        if t.token_type == TokenType.DOT or (t.token_type == TokenType.IDENTIFIER and not ATOM.fullmatch(t.text)) \
                or (t.token_type == TokenType.VAR and (after is None or after.token_type != TokenType.L_PAREN)):
            return None
        i += 1
    return out


def pattern_columns(conditions: list[str], alias: str, cells: list[str]) -> list[str] | None:
    """The columns to count rows by so that each condition (guard-rendered SQL over
    ``_flat_worlds``' source, aliased ``alias``) has one value per group: the columns of
    ``alias`` it reads besides the atoms, when all are among those the ``cells``
    expressions read (a dimension of the answer, so the groups stay about as many as
    cells x patterns of atoms); None otherwise (a measure or anything not recognised:
    the rows are then counted one by one). Sorted."""
    allowed: set[str] = set()
    for cell in cells:
        names = _names(cell, alias)
        if names is not None:
            allowed |= names
    read: set[str] = set()
    for sql in conditions:
        names = _names(sql, alias)
        if names is None or not names <= allowed:
            return None
        read |= names
    return sorted(read)


def pattern_counts(flag: str, suffix: str) -> list[str]:
    """``__n<suffix>``/``__ck<suffix>`` of the rows ``flag`` marks, over ``atom_patterns``."""
    return [f"CAST(COALESCE(SUM(__m) FILTER (WHERE {flag}), 0) AS BIGINT) AS __n{suffix}",
            f"{cell_key_sql(f'COALESCE(SUM(__s) FILTER (WHERE {flag}), 0)')} AS __ck{suffix}"]


def atom_patterns(cells: list[str], atoms: list[str], columns: list[str], rkey: str, source: str,
                  alias: str) -> str:
    """The rows of ``source`` counted per cell (``cells``: SQL, named ``__g<j>``), the
    ``columns`` of ``alias`` (``pattern_columns``) and pattern of atoms, with the sum of
    their record keys (``__m``, ``__s``), as a derived table named ``alias`` (so the
    conditions read it as they read the rows). A condition with one value per group
    counted over these is the same count as over the rows: the scan then hashes a few
    values per row instead of evaluating every neighbour's condition twice per row."""
    keys = [f"{c} AS {_q(f'__g{j}')}" for j, c in enumerate(cells)] + \
        [f"{_q(alias)}.{_q(c)} AS {_q(c)}" for c in columns] + [_q(a) for a in atoms]
    return (f"(SELECT {', '.join(keys + ['COUNT(*) AS __m', f'SUM({rkey}) AS __s'])} {source}"
            + (f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else "") + f") AS {_q(alias)}")


def _value(projection: exp.Expression) -> exp.Expression:
    return projection.this if isinstance(projection, exp.Alias) else projection


def influence_sql(row: exp.Expression, neighbours: list[Variant], columns: list[str], *,
                  person_unique: bool) -> str:
    """One SQL returning ``__n<i>`` (contributors changed by neighbour i) and ``__ck<i>``
    (their cell key), and ``__n``/``__ck`` for the contributors the query itself selects.
    ``row`` is the tree ``neighbourhood`` returned (the variants' positions refer to it);
    ``columns``: the row SELECT's cell and value columns (__g*, __a*)."""
    nodes = list(row.walk())
    if _simple(row):
        worlds, source, atoms, alias = _flat_worlds(row, nodes, neighbours)
        return _influence_flat(worlds, source, columns, person_unique=person_unique, atoms=atoms, alias=alias)
    base = _flat(row)
    if base is not None:   # derived tables that merge into one SELECT over one table
        flats = [_flat(variant_tree(row, v)) for v in neighbours]
        source = base.args["from_"].sql(dialect=DIALECT)
        if all(f is not None and f.args["from_"].sql(dialect=DIALECT) == source for f in flats):
            return _influence_flat([_parts(base)] + [_parts(f) for f in flats], source, columns,
                                   person_unique=person_unique)
    if unit_scope_shape(row) is not None:
        unit_sql = _influence_units(row, nodes, neighbours, columns)
        if unit_sql is not None:
            return unit_sql
    return _influence_general(row.sql(dialect=DIALECT), [variant_sql(row, v) for v in neighbours], columns)


def _flat_worlds(row: exp.Select, nodes, neighbours: list[Variant]
                 ) -> tuple[list[tuple[str, dict[str, str]]], str, list[str], str]:
    """(condition, projections) of the query and of each neighbour, the source they are
    evaluated on, the names of the atom columns it adds and the source's alias.

    Each atom a neighbour replaces is computed once per row, as a boolean column of the
    source (``__atom<j>``), and the query's parts are written over those columns: a
    neighbour's CASE or WHERE then differs from the query's in one boolean, instead of
    re-evaluating every comparison (an age from a birth month in 22 bands is 22
    comparisons of arithmetic, per neighbour). A neighbour's unchanged parts are the
    query's, rendered once. The base tree is left as it was."""
    roots = {(p.alias_or_name,): _value(p) for p in row.expressions}
    where = row.args.get("where")
    if where is not None:
        roots[("where",)] = where.this
    part_of = _part_of(roots)
    positions = sorted({v.index for v in neighbours if _local(v, nodes, part_of) is not None})
    columns = {i: exp.column(f"__atom{j}", quoted=True) for j, i in enumerate(positions)}
    atom_sql = [nodes[i].sql(dialect=DIALECT) for i in positions]

    def computed(replacement: exp.Expression) -> exp.Expression:
        # a replacement that is not a constant (an IN without one element, a BETWEEN
        # without one bound) is an atom column of its own as well
        if isinstance(replacement, exp.Boolean):
            return replacement
        sql = replacement.sql(dialect=DIALECT)
        if sql not in atom_sql:
            atom_sql.append(sql)
        return exp.column(f"__atom{atom_sql.index(sql)}", quoted=True)

    for i in positions:
        nodes[i].replace(columns[i])
    try:
        base = _parts(row)
        worlds = [base]
        for v in neighbours:
            key = _local(v, nodes, part_of)
            if key is None:
                for i in positions:   # a variant built elsewhere: written in full
                    columns[i].replace(nodes[i])
                try:
                    worlds.append(_parts(variant_tree(row, v)))
                finally:
                    for i in positions:
                        nodes[i].replace(columns[i])
                continue
            column, new = columns[v.index], computed(v.replacement)
            column.replace(new)
            try:
                if key == ("where",):
                    worlds.append((_cond(row.args["where"].this), base[1]))
                else:
                    projections = dict(base[1])
                    projections[key[0]] = _value(next(p for p in row.expressions if p.alias_or_name == key[0])
                                                 ).sql(dialect=DIALECT)
                    worlds.append((base[0], projections))
            finally:
                new.replace(column)
    finally:
        for i in positions:
            columns[i].replace(nodes[i])
    table = row.args["from_"].this
    if atom_sql:
        extra = ", ".join(f"{sql} AS {_q(f'__atom{j}')}" for j, sql in enumerate(atom_sql))
        source = f"FROM (SELECT *, {extra} FROM {table.sql(dialect=DIALECT)}) AS {_q(table.alias_or_name)}"
    else:
        source = row.args["from_"].sql(dialect=DIALECT)
    return worlds, source, [f"__atom{j}" for j in range(len(atom_sql))], table.alias_or_name


def _influence_units(row: exp.Select, nodes: list[exp.Expression], neighbours: list[Variant],
                     columns: list[str]) -> str | None:
    """All neighbours of a query over one unit scope in one scan of its view
    (``neighbour_units``): here, which part of the query each neighbour changes."""
    shape, nodes, part_of = unit_parts(row)
    return influence_units(row, shape, nodes, neighbours, columns, lambda v: _local(v, nodes, part_of))


def changed_conditions(worlds: list[tuple[str, dict[str, str]]], columns: list[str]) -> list[str]:
    """Per neighbour (world i >= 1), the condition on a row that it changes: its inclusion
    differs from the query's (world 0), or it is included by both with different cell or
    value columns."""
    cond0, proj0 = worlds[0]
    changed = []
    for cond, proj in worlds[1:]:
        terms = []
        if cond != cond0:   # (both are never NULL) a world of no row changes the query's own rows
            terms.append(f"({cond0})" if cond == "FALSE" else f"NOT ({cond0})" if cond == "TRUE"
                         else f"({cond0}) <> ({cond})")
        differs = [f"({proj0[c]}) IS DISTINCT FROM ({proj[c]})" for c in columns if proj0[c] != proj[c]]
        if differs:
            terms.append(f"(({cond0}) AND ({' OR '.join(differs)}))")
        changed.append(" OR ".join(terms) if terms else "FALSE")
    return changed


def unit_parts(row: exp.Select) -> tuple[tuple, list[exp.Expression], dict]:
    """(shape, nodes, part_of) of a query over one unit scope: what ``influence_units`` and
    ``unit_rows`` need to place each neighbour's change."""
    outer, inner = shape = unit_scope_shape(row)
    roots: dict[tuple, exp.Expression] = {("inner", p.alias_or_name): _value(p) for p in inner.expressions}
    if inner.args.get("where") is not None:
        roots[("inner_where",)] = inner.args["where"].this
    roots.update({("outer", p.alias_or_name): _value(p) for p in outer.expressions})
    if outer.args.get("where") is not None:
        roots[("outer_where",)] = outer.args["where"].this
    return shape, list(row.walk()), _part_of(roots)


def _influence_flat(worlds: list[tuple[str, dict[str, str]]], source: str, columns: list[str], *,
                    person_unique: bool, atoms: list[str] = (), alias: str = "") -> str:
    """All neighbours in one scan of ``source`` (world 0: the query's condition and
    projections; world i: neighbour i's): a row differs if its inclusion differs, or it
    is included by both with different cell or value columns."""
    cond0, proj0 = worlds[0]
    changed = changed_conditions(worlds, columns)
    pid, rkey = proj0[PID], proj0[RKEY]
    if person_unique:
        patterns = pattern_columns([cond0, *changed], alias, [proj0[c] for c in columns if c.startswith("__g")]) \
            if atoms else None
        flagged = [("", cond0), *((str(i), d) for i, d in enumerate(changed))]
        if patterns is not None:
            select = [a for suffix, d in flagged for a in pattern_counts(d, suffix)]
            return f"SELECT {', '.join(select)} FROM {atom_patterns([], atoms, patterns, rkey, source, alias)}"
        select = []
        for suffix, d in flagged:
            select.append(f"COUNT(*) FILTER (WHERE {d}) AS __n{suffix}")
            select.append(f"{cell_key_sql(f'COALESCE(SUM({rkey}) FILTER (WHERE {d}), 0)')} AS __ck{suffix}")
        return f"SELECT {', '.join(select)} {source}"
    # a person's key is the sum of their distinct record keys: taken as one row per (person,
    # record key) first, then summed per person — the same sums as SUM(DISTINCT), which
    # DuckDB computes far more slowly over a view's every person
    records = [f"{pid} AS __p", f"{rkey} AS __r", f"bool_or({cond0}) AS __in"] + \
        [f"bool_or({d}) AS __d{i}" for i, d in enumerate(changed)]
    inner = ["__p", "SUM(__r) AS __k", "bool_or(__in) AS __in", "SUM(__r) FILTER (WHERE __in) AS __kin"] + \
        [f"bool_or(__d{i}) AS __d{i}" for i in range(len(changed))]
    outer = ["COUNT(*) FILTER (WHERE __in) AS __n",
             f"{cell_key_sql('COALESCE(SUM(__kin) FILTER (WHERE __in), 0)')} AS __ck"]
    for i in range(len(changed)):
        outer.append(f"COUNT(*) FILTER (WHERE __d{i}) AS __n{i}")
        outer.append(f"{cell_key_sql(f'COALESCE(SUM(__k) FILTER (WHERE __d{i}), 0)')} AS __ck{i}")
    return (f"SELECT {', '.join(outer)} FROM (SELECT {', '.join(inner)} FROM (SELECT {', '.join(records)} "
            f"{source} GROUP BY {pid}, {rkey}) AS __pr GROUP BY __p) AS __pp")


def _influence_general(row_sql: str, neighbours: list[str], columns: list[str]) -> str:
    """Any row SELECT (joins, nested derived tables, ...): compare each contributor's rows
    as a multiset of (cell, values) between the query and each neighbour (given as SQL)."""
    cols = ", ".join([_q(PID), _q(RKEY), *(_q(c) for c in columns)])

    def rows(sql: str) -> str:
        return f"SELECT {cols}, COUNT(*) AS __m FROM ({sql}) AS __r GROUP BY ALL"

    ctes = [f"__s AS ({rows(row_sql)})",
            f"__base AS (SELECT {_q(PID)}, SUM(DISTINCT {_q(RKEY)}) AS __k FROM __s GROUP BY {_q(PID)})"]
    select = ["(SELECT COUNT(*) FROM __base) AS __n",
              f"(SELECT {cell_key_sql('COALESCE(SUM(__k), 0)')} FROM __base) AS __ck"]
    for i, neighbour_sql in enumerate(neighbours):
        ctes.append(f"__s{i} AS ({rows(neighbour_sql)})")
        ctes.append(f"__d{i} AS (SELECT {_q(PID)}, SUM(DISTINCT {_q(RKEY)}) AS __k FROM "
                    f"((SELECT * FROM __s EXCEPT SELECT * FROM __s{i}) UNION ALL "
                    f"(SELECT * FROM __s{i} EXCEPT SELECT * FROM __s)) AS __x GROUP BY {_q(PID)})")
        select.append(f"(SELECT COUNT(*) FROM __d{i}) AS __n{i}")
        select.append(f"(SELECT {cell_key_sql('COALESCE(SUM(__k), 0)')} FROM __d{i}) AS __ck{i}")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(select)}"
