"""The checks of one scope below a boundary, given its environment (``lineage``): the
row-level language applied to the scope's operands, its joins, clauses and projections,
and the shape of unit scopes (one row per household).

Each function is pure: it reads the SELECT and the environment ``alias -> column ->
Lineage`` of its sources, and raises ``QueryRefused`` or returns what the classifier
(``classify``) records for the scope.
"""

from __future__ import annotations

from sqlglot import exp

from sekisho.guard.catalog import LINKAGE, MEASURE, SENSITIVE
from sekisho.guard.checks import UNIT_AGGREGATES
from sekisho.guard.errors import QueryRefused, refuse
from sekisho.guard.language import ColumnFacts, RowLanguage, check_limits, widen_operands
from sekisho.guard.lineage import (AGGREGATED, DERIVED_DIMENSION, DERIVED_MEASURE, DERIVED_SENSITIVE,
                                   IDENTIFIER_CLASSES, Lineage, column_lineage, facts_of_column,
                                   facts_of_value, lineage_of_expression)


# ---- the row-level language over a scope's environment (sekisho.guard.language) ------
def resolver(env):
    """Facts of a column as a row-level operand: dimensions only (identifiers and
    measures may not decide whether a row counts or where it lands)."""
    def resolve(col: exp.Column) -> ColumnFacts:
        lineage = column_lineage(col, env)
        if lineage.cls in IDENTIFIER_CLASSES:
            raise refuse("privacy_unit_in_filter", col)
        if lineage.cls in (MEASURE, SENSITIVE, DERIVED_MEASURE, DERIVED_SENSITIVE, "mixed"):
            raise refuse("measure_in_filter", col)
        if lineage.cls == AGGREGATED:
            raise refuse("nested_aggregation", col)
        if lineage.facts is not None:
            return lineage.facts
        if lineage.base is not None:
            return facts_of_column(lineage.base)
        return ColumnFacts("unknown")
    return resolve


def check_condition(node: exp.Expression, env) -> None:
    check_limits(node)
    RowLanguage(resolver(env)).condition(node)


def check_value(node: exp.Expression, env):
    check_limits(node)
    return RowLanguage(resolver(env)).value(node)


def row_output(inner: exp.Expression, lineage: Lineage, env) -> Lineage:
    """A row-level projection: a bare column passes through with its class (an
    identifier for COUNT(DISTINCT), a measure for SUM/AVG above); anything else is a
    value of the language, over dimensions only."""
    if isinstance(inner, exp.Column):
        return lineage
    return Lineage(DERIVED_DIMENSION, facts=facts_of_value(check_value(inner, env)))


def widen(select: exp.Select, env) -> None:
    resolve = resolver(env)
    # the language's value of any operand: over the scope's rows, or (a unit feature) over
    # a unit's members — aggregates of members are values there
    languages = (RowLanguage(resolve), RowLanguage(_no_bare_member, unit_resolve=resolve))

    def facts_of(col: exp.Column) -> ColumnFacts | None:
        try:
            return resolve(col)
        except QueryRefused:
            return None

    def value_of(node: exp.Expression):
        for language in languages:
            try:
                return language.value(node)
            except QueryRefused:
                continue
        return None
    widen_operands(own_nodes(select), facts_of, value_of)


def _no_bare_member(col: exp.Column) -> ColumnFacts:
    raise refuse("unit_scope_not_allowed", col)


# ---- row scopes and boundaries -------------------------------------------------------
def check_row_scope(select: exp.Select, env) -> None:
    if select.args.get("distinct"):
        raise refuse("distinct_rows", select.args["distinct"])
    for clause in ("order", "limit", "offset"):
        if select.args.get(clause) is not None:
            raise refuse("limit_below_boundary", select.args[clause])
    for projection in select.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        lineage = lineage_of_expression(inner, env)
        if lineage.cls == "identifier_expression":
            raise refuse("privacy_unit_in_expression", projection)
        if lineage.cls == "mixed":
            raise refuse("measure_mixed_with_dimension", projection)
        if lineage.cls in (DERIVED_MEASURE, DERIVED_SENSITIVE):
            raise refuse("measure_arithmetic", projection)


def check_joins(select: exp.Select, personal_alias: str, env, handled=()) -> None:
    joins = select.args.get("joins") or []
    if not joins:
        return
    from_ = select.args.get("from_") or select.args.get("from")
    first = from_.this if from_ is not None else None
    if first is None or first.alias_or_name != personal_alias:
        raise refuse("join_not_allowed", joins[0])
    for join in joins:
        if id(join) in handled:
            continue   # on the person / household key: checked by ``joins.scope_links``
        side = (join.side or "").upper()
        kind = (join.kind or "").upper()
        if side not in ("", "LEFT") or kind not in ("", "INNER", "OUTER") or (kind == "OUTER" and side != "LEFT"):
            raise refuse("join_not_allowed", join)
        on = join.args.get("on")  # qualify turns USING into ON
        if on is None:
            raise refuse("join_not_allowed", join)
        check_condition(on, env)


def check_row_clauses(select: exp.Select, env) -> None:
    where = select.args.get("where")
    if where is not None:
        check_condition(where.this, env)
    group = select.args.get("group")
    if group is not None:
        for item in group.expressions:
            check_value(item, env)
    for node in own_nodes(select):
        if isinstance(node, exp.Window):
            raise refuse("window_below_boundary", node)
        if isinstance(node, exp.Filter):
            raise refuse("aggregate_filter", node)
        if isinstance(node, exp.Qualify):
            raise refuse("window_below_boundary", node)


# ---- unit rows: one row per linkage key (household), features aggregated over members 
def unit_scope_outputs(select: exp.Select, env) -> dict[str, Lineage]:
    """Check a unit scope and return its outputs: the linkage key, and unit features
    (aggregates over dimension-only expressions of the unit's members)."""
    items = select.args["group"].expressions
    if len(items) != 1 or not isinstance(items[0], exp.Column) \
            or column_lineage(items[0], env).cls != LINKAGE:
        raise refuse("unit_scope_not_allowed", select.args["group"])
    key = items[0]
    for clause in ("having", "order", "limit", "offset", "distinct", "qualify"):
        if select.args.get(clause):
            raise refuse("unit_scope_not_allowed", select.args[clause])
    where = select.args.get("where")
    if where is not None:
        check_condition(where.this, env)
    for node in own_nodes(select):
        if isinstance(node, (exp.Window, exp.Qualify)):
            raise refuse("window_below_boundary", node)
        if isinstance(node, exp.Filter):
            raise refuse("aggregate_filter", node)
    outputs: dict[str, Lineage] = {}
    for projection in select.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(inner, exp.Column) and inner.table == key.table and inner.name == key.name:
            outputs[projection.alias_or_name] = column_lineage(inner, env)
            continue
        check_unit_feature(inner, env, projection)
        check_limits(inner, projection)

        def outside_aggregate(col: exp.Column, part=projection) -> ColumnFacts:
            raise refuse("unit_scope_not_allowed", part)   # every member column sits inside an aggregate
        try:
            value = RowLanguage(outside_aggregate, unit_resolve=resolver(env)).value(inner)
        except QueryRefused as refusal:
            if refusal.code in ("privacy_unit_in_filter", "measure_in_filter"):
                # an identifier or measure inside a feature: the feature's shape is wrong
                raise refuse("unit_scope_not_allowed", projection) from None
            raise
        outputs[projection.alias_or_name] = Lineage(DERIVED_DIMENSION, facts=facts_of_value(value))
    widen(select, env)
    return outputs


def check_unit_feature(expression: exp.Expression, env, part: exp.Expression) -> None:
    """The shape of a unit feature: only unit aggregates (COUNT, SUM, MIN, MAX, COUNT_IF,
    BOOL_OR, BOOL_AND), none nested or windowed. Their arguments and what combines them
    are checked by the row-level language (``RowLanguage`` with ``unit_resolve``)."""
    for node in expression.walk():
        if not isinstance(node, exp.AggFunc):
            continue
        if not isinstance(node, UNIT_AGGREGATES) or inside_window(node, expression):
            raise refuse("unit_scope_not_allowed", node)
        for inner in node.find_all(exp.AggFunc):
            if inner is not node:
                raise refuse("unit_scope_not_allowed", node)


def unit_count(node: exp.AggFunc, env) -> bool:
    """COUNT(*) or COUNT(DISTINCT linkage key): the only ways to count unit rows."""
    if not isinstance(node, exp.Count):
        return False
    arg = node.this
    if arg is None or isinstance(arg, exp.Star):
        return True
    if isinstance(arg, exp.Distinct) and len(arg.expressions) == 1 and isinstance(arg.expressions[0], exp.Column):
        return column_lineage(arg.expressions[0], env).cls == LINKAGE
    return False


# ---- the shape of a SELECT -----------------------------------------------------------
def is_aggregate_scope(select: exp.Select) -> bool:
    if select.args.get("group"):
        return True
    for projection in select.expressions:
        for node in projection.walk():
            if isinstance(node, exp.AggFunc) and not inside_window(node, projection):
                return True
    having = select.args.get("having")
    return having is not None


def owned_by(node: exp.Expression, select: exp.Select) -> bool:
    """``node`` belongs to ``select`` itself, not to a nested SELECT."""
    parent = node.parent
    while parent is not None and parent is not select:
        if isinstance(parent, (exp.Select, exp.SetOperation)):
            return False
        parent = parent.parent
    return parent is select


def inside_window(node: exp.Expression, stop: exp.Expression) -> bool:
    parent = node.parent
    while parent is not None and parent is not stop.parent:
        if isinstance(parent, exp.Window):
            return True
        parent = parent.parent
    return False


def own_nodes(select: exp.Select):
    """Nodes of this SELECT excluding nested SELECTs/derived tables."""
    for node in select.walk(prune=lambda n: n is not select and isinstance(n, (exp.Select, exp.Subquery, exp.SetOperation))):
        if node is not select and isinstance(node, (exp.Select, exp.Subquery, exp.SetOperation)):
            continue
        yield node
