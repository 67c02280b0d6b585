"""Scope classification: every SELECT scope of the qualified tree gets a level (public,
row, unit, unit row, boundary, post-processing; the model is in ``analyze``'s docstring),
and every boundary its specification (``boundary``).

Scopes are classified bottom-up (``sqlglot``'s ``traverse_scope``): a scope's level
follows from its sources' levels and from whether it aggregates. The checks of row and
unit scopes are in ``scope_checks``, joins on the person and household keys in
``joins``. ``find_boundaries`` is the last pass of ``analyze`` and returns the
``Analysis``.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from sqlglot import exp
from sqlglot.errors import OptimizeError, SqlglotError
from sqlglot.optimizer.scope import Scope, traverse_scope

from sekisho.guard import joins, row_identity
from sekisho.guard.boundary import BoundarySpec, boundary_spec
from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused, refuse
from sekisho.guard.lineage import (AGGREGATED, BOUNDARY, DERIVED_DIMENSION, POST, PUBLIC, ROW, UNIT, UNIT_ROW,
                                   Lineage, column_lineage, facts_of_column, groups_by_identifier,
                                   groups_by_linkage, lineage_of_expression, mentions_identifier)
from sekisho.guard.scope_checks import (check_condition, check_joins, check_row_clauses, check_row_scope,
                                        is_aggregate_scope, owned_by, row_output, unit_count,
                                        unit_scope_outputs, widen)
from sekisho.guard.sqltext import fingerprint


@dataclass
class Analysis:
    expression: exp.Expression      # qualified, CTE-inlined tree (rewritten later)
    boundaries: list[BoundarySpec]
    views: list[str]
    public_only: bool
    fingerprint: str
    normalized_sql: str
    levels: dict[int, str] = field(default_factory=dict)
    links: dict[int, "joins.RowInfo"] = field(default_factory=dict)   # per row-level scope (``joins``)


class _Classifier:
    """The levels, outputs and personal views of the scopes classified so far (bottom-up),
    the boundaries found, and what the joins of each row-level scope mean (``joins``)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.levels: dict[int, str] = {}
        self.outputs: dict[int, dict[str, Lineage]] = {}
        self.personal_view: dict[int, str | None] = {}
        self.boundaries: list[BoundarySpec] = []
        self.row_info: dict[int, joins.RowInfo] = {}

    # environment: alias -> column -> lineage, for the sources of a scope
    def _env(self, scope: Scope) -> tuple[dict[str, dict[str, Lineage]], list[tuple[str, str, object]]]:
        env: dict[str, dict[str, Lineage]] = {}
        sources: list[tuple[str, str, object]] = []   # (alias, level, source)
        items = list(scope.selected_sources.items())
        # SEMI/ANTI-joined sources are not "selected" (their columns exist only in the
        # join's ON, ``joins``), but they are sources to check like any other
        for alias in getattr(scope, "_semi_anti_join_tables", ()) or ():
            source = scope.sources.get(alias)
            if alias not in scope.selected_sources and source is not None:
                items.append((alias, (source.expression if isinstance(source, Scope) else source, source)))
        for alias, (node, source) in items:
            if isinstance(source, exp.Table):
                view = self.catalog.views.get(source.name)
                if view is None:
                    raise refuse("unknown_view", source)
                if view.public:
                    # public data joined to person rows behaves like a dimension
                    env[alias] = {c: Lineage(DERIVED_DIMENSION, facts=facts_of_column(info))
                                  for c, info in view.columns.items()}
                    sources.append((alias, PUBLIC, source))
                else:
                    env[alias] = {c: Lineage(info.cls, info) for c, info in view.columns.items()}
                    sources.append((alias, ROW, source))
            elif isinstance(source, Scope):
                key = id(source.expression)
                level = self.levels[key]
                out = self.outputs[key]
                if level == PUBLIC:
                    out = {c: Lineage(DERIVED_DIMENSION) for c in out}
                elif level in (POST, BOUNDARY):
                    out = {c: Lineage(AGGREGATED) for c in out}
                env[alias] = out
                source_level = (ROW if level == ROW else UNIT if level in (UNIT, UNIT_ROW)
                                else POST if level in (POST, BOUNDARY) else PUBLIC)
                sources.append((alias, source_level, source))
            else:
                raise refuse("syntax_not_allowed", node)
        return env, sources

    def classify(self, scope: Scope) -> None:
        expression = scope.expression
        key = id(expression)
        if getattr(scope, "udtf_scopes", None):
            raise refuse("syntax_not_allowed", expression)
        if scope.is_subquery:
            raise refuse("subquery_in_expression", expression)
        if isinstance(expression, exp.SetOperation):
            child_levels = [self.levels[id(s.expression)] for s in scope.set_operation_scopes]
            if {ROW, UNIT, UNIT_ROW} & set(child_levels):
                raise refuse("set_operation_below_boundary", expression)
            level = PUBLIC if all(lv == PUBLIC for lv in child_levels) else POST
            self.levels[key] = level
            left = scope.set_operation_scopes[0]
            self.outputs[key] = {name: Lineage(AGGREGATED) for name in self.outputs[id(left.expression)]}
            return
        if not isinstance(expression, exp.Select):
            raise refuse("syntax_not_allowed", expression)
        env, sources = self._env(scope)
        # joins on the person / household key (``joins``): the joined person-level and
        # unit sources are checked there; the FROM source stays the one personal source
        info = joins.scope_links(expression, env, sources, self.catalog, self.row_info, row=ROW, unit=UNIT,
                                 public=PUBLIC, condition=lambda node: check_condition(node, env),
                                 column_lineage=column_lineage)
        linked = {j.this.alias_or_name for j in expression.args.get("joins") or []
                  if info is not None and id(j) in info.handled}
        source_levels = [lvl for a, lvl, _ in sources if a not in linked]
        personal = [(a, s) for a, lvl, s in sources if lvl == ROW and a not in linked]
        aggregate = is_aggregate_scope(expression)

        if any(lvl == UNIT for lvl in source_levels):
            self._classify_over_units(expression, env, sources, aggregate)
            return
        if not personal:
            level = PUBLIC if all(lvl == PUBLIC for lvl in source_levels) else POST
            self.levels[key] = level
            self.outputs[key] = {sel.alias_or_name: Lineage(AGGREGATED) for sel in expression.expressions}
            return
        if len(personal) > 1:
            raise refuse("personal_join", expression.args.get("joins", [expression])[0])
        if POST in source_levels:
            raise refuse("nested_aggregation", expression)
        personal_alias, personal_source = personal[0]
        check_joins(expression, personal_alias, env, handled=info.handled if info is not None else ())
        view = (personal_source.name if isinstance(personal_source, exp.Table)
                else self.personal_view[id(personal_source.expression)])
        self.personal_view[key] = view
        if info is not None:
            self.row_info[key] = info
        if aggregate and groups_by_linkage(expression, env):
            if info is not None and info.person_joins:
                # a unit's features from joined person rows: each member once (no fan-out),
                # and only the member's own rows (no other household's facts)
                if info.household:
                    raise refuse("unit_scope_not_allowed", expression.args["joins"][0])
                if info.multi or info.per_cell:
                    several = info.multi | info.per_cell
                    raise row_identity.fan_out(self.catalog, several, ", ".join(sorted(several)))
            self.outputs[key] = unit_scope_outputs(expression, env)
            self.levels[key] = UNIT
            return
        check_row_clauses(expression, env)
        if aggregate:
            self.levels[key] = BOUNDARY
            widen(expression, env)
            spec = boundary_spec(expression, env, view)
            if info is not None:
                joins.check_measures(spec.aggregates, info, self.catalog)
                spec.household = info.household
                spec.join_one_row = info.person_joins and not (info.multi or info.per_cell or info.public_join
                                                               or info.household)
                if info.person_joins and info.per_cell and not (info.multi or info.public_join or info.household):
                    # one row per person in each cell: in as many cells as the grouped identity
                    # columns' domains allow, multiplied over the parts (``dp_bounds``)
                    sizes = [info.per_cell_groups.get(view) for view in info.per_cell]
                    if all(size is not None for size in sizes):
                        spec.join_groups = math.prod(sizes)
                if info.household:
                    # the household is the contributor: a count of distinct persons is a
                    # distinct count of its argument, not of contributors
                    for agg in spec.aggregates:
                        if agg.kind == "count_persons":
                            agg.kind = "count_households"
            self.boundaries.append(spec)
            self.outputs[key] = {sel.alias_or_name: Lineage(AGGREGATED) for sel in expression.expressions}
        else:
            check_row_scope(expression, env)
            self.levels[key] = ROW
            self.outputs[key] = {sel.alias_or_name: row_output(
                sel.this if isinstance(sel, exp.Alias) else sel, lineage_of_expression(sel, env), env)
                for sel in expression.expressions}
            widen(expression, env)

    def _classify_over_units(self, select: exp.Select, env, sources, aggregate: bool) -> None:
        """A scope reading unit rows: row-level work on them (``UNIT_ROW``) or the unit
        boundary that counts them (COUNT(*) / COUNT(DISTINCT linkage key) per group of
        unit features). The linkage key never becomes a group key, a filter operand or
        an output here, so no per-household row leaves the boundary."""
        key = id(select)
        units = [(a, s) for a, lvl, s in sources if lvl == UNIT]
        if len(units) > 1 or any(lvl == ROW for _, lvl, _ in sources):
            raise refuse("personal_join", select.args.get("joins", [select])[0])
        if any(lvl == POST for _, lvl, _ in sources):
            raise refuse("nested_aggregation", select)
        unit_alias, unit_source = units[0]
        group = select.args.get("group")
        if group is not None and groups_by_identifier(select, env):
            items = group.expressions
            nested = len(items) == 1 and isinstance(items[0], exp.Column)
            raise refuse("unit_scope_nested" if nested else "linkage_key_output", group)
        for clause in ("where", "having"):
            part = select.args.get(clause)
            if part is not None and mentions_identifier(part, env):
                raise refuse("linkage_key_output", part)
        for join in select.args.get("joins") or []:
            if mentions_identifier(join, env):
                raise refuse("linkage_key_output", join)
        check_joins(select, unit_alias, env)
        check_row_clauses(select, env)
        view = self.personal_view[id(unit_source.expression)]
        self.personal_view[key] = view
        if aggregate:
            for node in select.find_all(exp.AggFunc):
                if owned_by(node, select) and not unit_count(node, env):
                    raise refuse("unit_aggregate_not_allowed", node)
            widen(select, env)
            spec = boundary_spec(select, env, view)
            spec.unit = True
            self.levels[key] = BOUNDARY
            self.boundaries.append(spec)
            self.outputs[key] = {sel.alias_or_name: Lineage(AGGREGATED) for sel in select.expressions}
            return
        if select.args.get("distinct"):
            raise refuse("distinct_rows", select.args["distinct"])
        for clause in ("order", "limit", "offset"):
            if select.args.get(clause) is not None:
                raise refuse("limit_below_boundary", select.args[clause])
        outputs: dict[str, Lineage] = {}
        for projection in select.expressions:
            inner = projection.this if isinstance(projection, exp.Alias) else projection
            lineage = lineage_of_expression(inner, env)
            if lineage.cls == "identifier_expression":
                raise refuse("linkage_key_output", projection)
            outputs[projection.alias_or_name] = row_output(inner, lineage, env)
        widen(select, env)
        self.levels[key] = UNIT_ROW
        self.outputs[key] = outputs


def find_boundaries(tree: exp.Expression, catalog: Catalog) -> Analysis:
    classifier = _Classifier(catalog)
    try:
        scopes = list(traverse_scope(tree))
    except (OptimizeError, SqlglotError, RecursionError, KeyError, AttributeError, ValueError) as exc:
        raise QueryRefused("syntax_not_allowed", part=str(exc)[:200]) from None
    if not scopes:
        raise refuse("syntax_not_allowed", tree)
    for scope in scopes:
        classifier.classify(scope)
    root = scopes[-1]
    if classifier.levels[id(root.expression)] in (ROW, UNIT, UNIT_ROW):
        raise refuse("row_level_output", root.expression.expressions[0] if isinstance(root.expression, exp.Select) else root.expression)
    views = sorted({t.name for t in tree.find_all(exp.Table) if t.name in catalog.views})
    public_only = all(catalog.views[v].public for v in views)
    normalized, digest = fingerprint(tree, fold_case=True)
    return Analysis(expression=tree, boundaries=classifier.boundaries, views=views,
                    public_only=public_only, fingerprint=digest, normalized_sql=normalized,
                    levels=classifier.levels, links=classifier.row_info)
