"""Rewrite an analysed query into (a) one row-level SELECT per aggregation boundary,
run on the store, and (b) the post-processing SELECT, run on protected tables only.

For boundary ``i`` the row SELECT projects ``__g0..`` (group-by expressions), ``__a0..``
(aggregate arguments), ``__pid`` (privacy unit) and ``__rkey`` (record key), with the
boundary's own FROM/JOIN/WHERE. ``__pid`` and ``__rkey`` are carried up through every
derived table below the boundary by appending them to its projection (they are not
in the analyst-visible schema, so no analyst expression can name them).

A unit boundary (counting households) reads a unit scope (GROUP BY linkage key); there
``__pid`` is the linkage key and ``__rkey`` the unit key (SUM of member record keys mod
256), so the unit is the contributor of every cell computed above it.

In the tree, the boundary SELECT itself becomes ``SELECT <its projection with aggregates
replaced by __v columns and group expressions by __g columns> FROM __b<i> WHERE
<its HAVING> ORDER BY ... LIMIT ...``; protected values are thus the only inputs of
everything above the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp

from sekisho.guard import hidden, joins
from sekisho.guard.boundary import AggregateSpec, BoundarySpec, GroupKeySpec
from sekisho.guard.catalog import Catalog
from sekisho.guard.classify import Analysis
from sekisho.guard.errors import refuse
from sekisho.guard.hidden import PID, RKEY
from sekisho.guard.lineage import ROW, UNIT, UNIT_ROW
from sekisho.guard.sqltext import DIALECT


@dataclass(frozen=True)
class BoundaryPlan:
    name: str                       # table name of the protected result in post-processing
    row_sql: str                    # row-level SELECT to run on the store (``row`` rendered once)
    personal_view: str
    group_keys: tuple[GroupKeySpec, ...]
    aggregates: tuple[AggregateSpec, ...]
    filtered: bool
    has_join: bool = False
    unit: bool = False              # rows are units: __pid = linkage key, __rkey = unit key
    household: bool = False         # person rows with household facts: __pid = household key (``joins``)
    join_one_row: bool = False      # joined on keys, one row per person by declaration (``dp_bounds``)
    join_groups: int | None = None  # ... one row per person per cell, in at most this many cells
    row: exp.Select | None = field(default=None, compare=False, repr=False)   # the row SELECT as a tree


@dataclass(frozen=True)
class Plan:
    boundaries: tuple[BoundaryPlan, ...]
    post_sql: str
    views: tuple[str, ...]
    public_views: tuple[str, ...]
    public_only: bool
    fingerprint: str
    normalized_sql: str
    # when the post-processing is only a renaming of one protected table's columns:
    # ((protected column, output name), ...) so it can be applied without an engine
    passthrough: tuple[tuple[str, str], ...] | None = None


def _ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _col(name: str, table: str | None = None) -> exp.Column:
    return exp.Column(this=_ident(name), table=_ident(table) if table else None)


def _sources(select: exp.Select) -> list[exp.Expression]:
    from_ = select.args.get("from_")
    out = [from_.this] if from_ is not None else []
    out += [j.this for j in select.args.get("joins") or []]
    return out


def _carry(select: exp.Select, analysis: Analysis, catalog: Catalog, append: bool) -> tuple[exp.Column, exp.Column]:
    """Return the (privacy unit, record key) columns of ``select``'s personal source,
    appending ``__pid``/``__rkey`` to the projections of row-level derived tables."""
    for source in _sources(select):
        if isinstance(source, exp.Table):
            view = catalog.views.get(source.name)
            if view is not None and not view.public:
                alias = source.alias_or_name
                pid, rkey = _col(view.privacy_unit, alias), _col("_rkey", alias)
                break
        elif isinstance(source, exp.Subquery) and analysis.levels.get(id(source.this)) in (ROW, UNIT_ROW):
            _carry(source.this, analysis, catalog, append=True)
            alias = source.alias_or_name
            pid, rkey = _col(PID, alias), _col(RKEY, alias)
            break
        elif isinstance(source, exp.Subquery) and analysis.levels.get(id(source.this)) == UNIT:
            _carry_unit(source.this, analysis, catalog)
            alias = source.alias_or_name
            pid, rkey = _col(PID, alias), _col(RKEY, alias)
            break
    else:
        raise refuse("syntax_not_allowed", select)
    info = analysis.links.get(id(select))
    if info is not None:
        if info.rkey_alias is not None:
            rkey = _col("_rkey", info.rkey_alias)
        if info.household_key is not None:
            # household facts joined here: the household is the contributor from this
            # scope up; persons without a household belong to no household and are left out
            pid = info.household_key.copy()
            select.where(joins.structural_not_null(pid), copy=False)
    if append:
        select.select(exp.alias_(pid.copy(), PID, quoted=True), exp.alias_(rkey.copy(), RKEY, quoted=True),
                      copy=False)
    return pid, rkey


def _carry_unit(select: exp.Select, analysis: Analysis, catalog: Catalog) -> None:
    """Make a unit scope carry the unit as the contributor: ``__pid`` is its linkage key
    and ``__rkey`` the unit key, SUM(member record keys) mod 256 — the same members give
    the same key whatever the query text. Rows with a NULL linkage key belong to no unit
    and are left out."""
    _, member_rkey = _carry(select, analysis, catalog, append=False)
    linkage = select.args["group"].expressions[0]
    unit_key = exp.Cast(this=exp.Mod(this=exp.Sum(this=member_rkey.copy()), expression=exp.Literal.number(256)),
                        to=exp.DataType.build("INTEGER"))
    select.select(exp.alias_(linkage.copy(), PID, quoted=True), exp.alias_(unit_key, RKEY, quoted=True), copy=False)
    select.where(exp.Not(this=exp.Is(this=linkage.copy(), expression=exp.Null())), copy=False)


def _rewrite_boundary(index: int, spec: BoundarySpec, analysis: Analysis, catalog: Catalog) -> BoundaryPlan:
    select = spec.select
    name = hidden.boundary_table(index)
    pid, rkey = _carry(select, analysis, catalog, append=False)

    row = exp.Select()
    projections = [exp.alias_(k.expr.copy(), hidden.group_key(j), quoted=True) for j, k in enumerate(spec.group_keys)]
    for j, agg in enumerate(spec.aggregates):
        if agg.arg is not None:
            projections.append(exp.alias_(agg.arg.copy(), hidden.argument(j), quoted=True))
    projections += [exp.alias_(pid, PID, quoted=True), exp.alias_(rkey, RKEY, quoted=True)]
    row.set("expressions", projections)
    # FROM, JOINs and WHERE move into the row SELECT rather than being copied: the
    # boundary SELECT gives them up below (it reads the protected table instead), so they
    # are the row SELECT's alone (a copy of a large FROM, e.g. inlined CTEs, is not free)
    joins, where = select.args.get("joins"), select.args.get("where")
    row.set("from_", select.args["from_"])
    if joins:
        row.set("joins", list(joins))
    if where is not None:
        row.set("where", where)
    # a failed CAST would make the engine quote the offending value: row-level casts
    # become TRY_CAST (NULL on failure), so errors cannot carry data
    row = row.transform(lambda n: exp.TryCast(this=n.this, to=n.args.get("to"))
                        if type(n) is exp.Cast else n, copy=False)
    has_join = any(True for _ in row.find_all(exp.Join))
    # a filter anywhere below the boundary (also inside derived tables) selects a population
    filtered = spec.filtered or has_join or any(True for _ in row.find_all(exp.Where))
    row_sql = row.sql(dialect=DIALECT)

    # the boundary becomes post-processing over the protected table
    for j, agg in enumerate(spec.aggregates):
        agg.node.replace(_col(hidden.protected_value(j), name))
    keys = [(k.expr, hidden.group_key(j)) for j, k in enumerate(spec.group_keys)]

    def to_keys(node: exp.Expression) -> exp.Expression:
        for expr, col in keys:
            if node == expr:
                return _col(col, name)
        return node

    new_projections = [p.transform(to_keys, copy=False) for p in select.expressions]
    having = select.args.get("having")
    order = select.args.get("order")
    having_cond = having.this.transform(to_keys, copy=False) if having is not None else None
    if order is not None:
        order = order.transform(to_keys, copy=False)
    select.set("expressions", new_projections)
    select.set("from_", exp.From(this=exp.Table(this=_ident(name))))
    select.set("joins", None)
    select.set("where", exp.Where(this=having_cond) if having_cond is not None else None)
    select.set("group", None)
    select.set("having", None)
    select.set("order", order)
    aliases = {p.alias_or_name for p in new_projections}
    for part in [*new_projections, select.args.get("where"), order]:
        if part is None:
            continue
        for col in part.find_all(exp.Column):
            if col.table == name:
                continue
            if not col.table and col.name in aliases and part is order:
                continue
            raise refuse("ungrouped_column", col)
    return BoundaryPlan(name=name, row_sql=row_sql, personal_view=spec.personal_view,
                        group_keys=tuple(spec.group_keys), aggregates=tuple(spec.aggregates),
                        filtered=filtered, has_join=has_join, unit=spec.unit, household=spec.household,
                        join_one_row=spec.join_one_row, join_groups=spec.join_groups, row=row)


def plan(analysis: Analysis, catalog: Catalog) -> Plan:
    """Rewrite the analysed tree (in place) and return the execution plan."""
    boundaries = tuple(_rewrite_boundary(i, spec, analysis, catalog)
                       for i, spec in enumerate(analysis.boundaries))
    tree = analysis.expression
    public_views = tuple(sorted({t.name for t in tree.find_all(exp.Table)
                                 if t.name in catalog.views and catalog.views[t.name].public}))
    return Plan(boundaries=boundaries, post_sql=tree.sql(dialect=DIALECT), views=tuple(analysis.views),
                public_views=public_views, public_only=analysis.public_only,
                fingerprint=analysis.fingerprint, normalized_sql=analysis.normalized_sql,
                passthrough=_passthrough(tree, boundaries))


def _passthrough(tree: exp.Expression, boundaries) -> tuple[tuple[str, str], ...] | None:
    if len(boundaries) != 1 or not isinstance(tree, exp.Select):
        return None
    name = boundaries[0].name
    from_ = tree.args.get("from_")
    if from_ is None or not isinstance(from_.this, exp.Table) or from_.this.name != name:
        return None
    for clause in ("joins", "where", "group", "having", "order", "limit", "offset", "distinct", "qualify",
                   "with_", "windows"):
        if tree.args.get(clause):
            return None
    mapping = []
    for projection in tree.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if not isinstance(inner, exp.Column) or inner.table not in ("", name):
            return None
        mapping.append((inner.name, projection.alias_or_name))
    names = [out for _, out in mapping]
    return tuple(mapping) if len(set(names)) == len(names) else None
