"""The condition-influence count of a query over one unit scope, in one scan of its view
(``neighbour_counts.influence_sql`` chooses it; tests check it against the general form).

World 0 is the query, world i its neighbour i (same view and linkage key; they differ in
the unit scope's WHERE or features, or the outer part). A unit's features in a world are
its aggregates over that world's rows; it exists there when a row passes that world's
WHERE; a unit is a changed contributor of neighbour i when its (inclusion, cell and value
columns, unit key) differ from world 0's — what the general form counts, with the same
cell key. ``cell_influence`` counts the same worlds per cell (``unit_worlds``).

Cost (reports/06's 家族類型 at 530k: 94 neighbours in 1.4 CPU-s, from 4.5): the statement
is built in levels so that no piece of work is done twice, and no work is done per
household that can be done per kind of household:

0. per row: each world's WHERE (constants folded: neighbours that select the same rows
   share everything) and each COUNT_IF condition, once, as booleans;
1. ``GROUP BY`` the linkage key: every distinct aggregate of every world, once
   (``__a<j>``), and the bare columns a feature reads (the key);
2. every distinct comparison over those (``__b<j>``: e.g. ``COUNT(*) = 2 + ...``), as a
   boolean; only expressions that cannot fail are lifted (comparisons of columns,
   constants and + - *), so no value is computed that the query would not compute;
3. every distinct feature of every world (``__f<j>``) over the booleans: a neighbour
   that replaces one comparison of a 家族類型 CASE differs from the query in one boolean;
4. the counts (``_count``): most neighbours over groups of units with equal level-1
   values, the others unit by unit. A neighbour whose WHERE selects no row at all is
   known without the data: it changes exactly the query's own contributors.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from sekisho.guard.sqltext import DIALECT
from sekisho.guard.hidden import RKEY
from sekisho.guard.neighbours import Variant, variant_tree
from sekisho.guard.protect.cellkey import cell_key_sql
from sekisho.guard.unit_levels import _ancestors, _Levels, _q, fold

def _value(projection: exp.Expression) -> exp.Expression:
    return projection.this if isinstance(projection, exp.Alias) else projection


def _cond(where: exp.Expression | None) -> str:
    return f"COALESCE(({where.sql(dialect=DIALECT)}), FALSE)" if where is not None else "TRUE"


@dataclass
class _World:
    present: str | None          # level-2 boolean: the unit exists in this world (None: no unit does)
    cond: str                    # the outer WHERE over this world's features
    proj: dict[str, str]         # the outer projections over this world's features
    features: dict[str, str]     # unit feature name -> level-3 column
    local: bool = True           # one replacement in the query's own tree


def influence_units(row: exp.Select, shape, nodes: list[exp.Expression], neighbours: list[Variant],
                    columns: list[str], locate) -> str | None:
    """One SQL for every neighbour of a query over one unit scope (module docstring)."""
    built = unit_worlds(row, shape, nodes, neighbours, columns, locate)
    return None if built is None else _count(*built)


def unit_worlds(row: exp.Select, shape, nodes: list[exp.Expression], neighbours: list[Variant],
                columns: list[str], locate, levels: "_Levels | None" = None):
    """``_count``'s arguments, or None when a neighbour is not a query over the same unit
    scope. ``shape``: (outer, unit scope) of ``row``; ``locate(variant)``: the part of the
    row tree a variant changes (``("inner", name)``, ``("inner_where",)``, ``("outer",
    ...)``, ``("outer_where",)``), or None for a whole tree; ``levels``: shared by trees (one GROUP BY)."""
    outer, inner = shape
    table_node = inner.args["from_"].this
    table = table_node.sql(dialect=DIALECT)
    key = inner.args["group"].expressions[0]
    scope = outer.args["from_"].this.alias_or_name
    levels = _Levels() if levels is None else levels

    def rows_of(inner_select: exp.Select) -> str | None:
        """A world's WHERE as SQL (constants folded, so that neighbours selecting the same
        rows share their aggregates), or None when it selects no row."""
        where = inner_select.args.get("where")
        folded = fold(where.this) if where is not None else exp.true()
        return None if isinstance(folded, exp.Boolean) and not folded.this else _cond(folded)

    def unit_scope(inner_select: exp.Select) -> tuple[str | None, dict[str, str]]:
        """(presence column, feature name -> column) of one world's unit scope; (None, {})
        when it has no row."""
        rows = rows_of(inner_select)
        if rows is None:
            return None, {}
        return levels.present(rows), {p.alias_or_name: levels.feature(_value(p), rows)
                                      for p in inner_select.expressions}

    def world(outer_select: exp.Select, present: str | None, features: dict[str, str], local: bool = True) -> _World:
        if present is None:   # no unit exists: it changes exactly the query's own contributors
            return _World(None, "FALSE", {}, {}, local)
        def in_world(node):
            if isinstance(node, exp.Column) and node.table == scope and node.name in features:
                return exp.column(features[node.name], quoted=True)
            return node
        where = outer_select.args.get("where")
        cond = _cond(where.this.transform(in_world)) if where is not None else "TRUE"
        return _World(present, cond, {p.alias_or_name: _value(p).transform(in_world).sql(dialect=DIALECT)
                                      for p in outer_select.expressions}, features, local)

    present0, features0 = unit_scope(inner)
    worlds = [world(outer, present0, features0)]
    rows0 = rows_of(inner)
    for v in neighbours:
        part = locate(v)
        if part is None:   # a variant built elsewhere: all its parts
            other = _shape_of(variant_tree(row, v))
            if other is None or other[1].args["from_"].this.sql(dialect=DIALECT) != table \
                    or other[1].args["group"].expressions[0] != key:
                return None
            worlds.append(world(other[0], *unit_scope(other[1]), local=False))
            continue
        node, new = nodes[v.index], v.replacement
        node.replace(new)
        levels.dirty = frozenset(id(a) for a in _ancestors(new))
        try:
            if part == ("inner_where",):
                worlds.append(world(outer, *unit_scope(inner)))
            elif part[0] == "inner":
                changed = next(p for p in inner.expressions if p.alias_or_name == part[1])
                worlds.append(world(outer, present0,
                                    dict(features0, **{part[1]: levels.feature(_value(changed), rows0)})))
            else:   # the outer part: the query's unit scope
                worlds.append(world(outer, present0, features0))
        finally:
            levels.dirty = frozenset()
            new.replace(node)

    def read(select: exp.Select, names) -> set[str]:
        """The unit features the outer part reads in the given projections and its WHERE."""
        parts = [_value(p) for p in select.expressions if p.alias_or_name in names]
        if select.args.get("where") is not None:
            parts.append(select.args["where"].this)
        return {c.name for part in parts for c in part.find_all(exp.Column) if c.table == scope}
    return levels, levels.level1(table_node, key), worlds, columns, read(outer, set(columns)), read(outer, {RKEY})


def _shape_of(tree: exp.Expression):
    from sekisho.guard.neighbour_counts import unit_scope_shape
    return unit_scope_shape(tree)


def _included(w: _World) -> str:
    return f"({_q(w.present)} AND {w.cond})"


def _changed(w0: _World, w: _World, compared: list[str]) -> str:
    """SQL: a unit's (inclusion, compared columns) differ between world 0 and ``w``; a
    column written alike in both worlds is equal to itself and is not compared."""
    in0, in_i = _included(w0), _included(w)
    terms = [f"({in0}) <> ({in_i})"] if in_i != in0 else []
    differs = [f"({w0.proj[c]}) IS DISTINCT FROM ({w.proj[c]})" for c in compared if w0.proj[c] != w.proj[c]]
    if differs:
        both = in0 if in_i == in0 else f"{in0} AND {in_i}"
        terms.append(f"({both} AND ({' OR '.join(differs)}))")
    return f"({' OR '.join(terms)})" if terms else "FALSE"


def _count(levels: _Levels, level1: str, worlds: list[_World], columns: list[str], cell_reads: set[str],
           key_reads: set[str]) -> str:
    """Level 4: the query's contributors and, per neighbour, those it changes.

    A neighbour whose unit key is written as the query's (every one that does not change
    the unit scope's WHERE) changes a unit or not as a function of the unit's level-1
    values alone, and its changed units' key sum is the sum of the query's unit keys
    over them: the units are grouped by those values (household compositions: a few
    hundred groups instead of every household), and such neighbours are counted over
    the groups. The others are decided unit by unit, as ``_influence_general`` compares
    them, and summed within each group on the way."""
    w0 = worlds[0]
    rkey0 = w0.proj[RKEY]
    empty = {i for i, w in enumerate(worlds) if w.present is None}
    grouped = [0] + [i for i, w in enumerate(worlds) if i and i not in empty and w.local and w.proj[RKEY] == rkey0]
    by_unit = [i for i in range(1, len(worlds)) if i not in grouped and i not in empty]
    in0 = _included(w0)

    # per unit: the query's unit key and what the unit-by-unit neighbours need
    group_cols = {worlds[i].present for i in grouped} | {worlds[i].features[n] for i in grouped for n in cell_reads}
    keys = sorted(levels.level1_reads(group_cols))
    unit_cols = {w0.present} | {w0.features[n] for n in cell_reads | key_reads}
    for i in by_unit:
        unit_cols |= {worlds[i].present, *worlds[i].features.values()}
    per_unit = [f"{rkey0} AS __rk"]
    partial = ["COUNT(*) AS __cnt", "SUM(__rk) AS __srk"]
    same: dict[tuple[str, str], int] = {}   # neighbours written alike are counted once
    alias: dict[int, int] = {}
    for i in by_unit:
        w = worlds[i]
        rkey_i, in_i = w.proj[RKEY], _included(w)
        new_key = f"{in_i} AND NOT {in0}" if rkey_i == rkey0 else \
            f"{in_i} AND (NOT {in0} OR ({rkey_i}) IS DISTINCT FROM ({rkey0}))"
        changed = _changed(w0, w, [*columns, RKEY])
        keys_i = f"(CASE WHEN {in0} THEN {rkey0} ELSE 0 END + CASE WHEN {new_key} THEN {rkey_i} ELSE 0 END)"
        alias[i] = same.setdefault((changed, keys_i), i)
        if alias[i] != i:
            continue
        per_unit += [f"{changed} AS __c{i}", f"{keys_i} AS __k{i}"]
        partial += [f"COUNT_IF(__c{i}) AS __cn{i}", f"SUM(CASE WHEN __c{i} THEN __k{i} END) AS __sk{i}"]
    units = f"SELECT {', '.join([*(_q(k) for k in keys), *per_unit])} FROM {levels.over(f'({level1}) AS __l1', levels.closure(unit_cols))}"
    keys_sql = ", ".join(_q(k) for k in keys)
    groups = f"SELECT {', '.join([keys_sql, *partial])} FROM ({units}) AS __u GROUP BY {keys_sql}"

    # per group: the grouped neighbours
    own = (f"CAST(COALESCE(SUM(__cnt) FILTER (WHERE {in0}), 0) AS BIGINT)",
           cell_key_sql(f"COALESCE(SUM(__srk) FILTER (WHERE {in0}), 0)"))
    select = [f"{own[0]} AS __n", f"{own[1]} AS __ck"]
    for i in range(1, len(worlds)):
        if i in empty:   # known without the data: every contributor of the query changes
            select += [f"{own[0]} AS __n{i - 1}", f"{own[1]} AS __ck{i - 1}"]
            continue
        if i in by_unit:
            select.append(f"CAST(COALESCE(SUM(__cn{alias[i]}), 0) AS BIGINT) AS __n{i - 1}")
            select.append(f"{cell_key_sql(f'COALESCE(SUM(__sk{alias[i]}), 0)')} AS __ck{i - 1}")
            continue
        changed = _changed(w0, worlds[i], columns)
        select.append(f"CAST(COALESCE(SUM(__cnt) FILTER (WHERE {changed}), 0) AS BIGINT) AS __n{i - 1}")
        select.append(f"{cell_key_sql(f'COALESCE(SUM(__srk) FILTER (WHERE {changed}), 0)')} AS __ck{i - 1}")
    return f"SELECT {', '.join(select)} FROM {levels.over(f'({groups}) AS __g', levels.closure(group_cols))}"
