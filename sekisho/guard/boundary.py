"""What a boundary computes: its group keys and its aggregates, each checked against the
row-level language — the specification the rewrite turns into row SELECTs and cells.

A boundary is the aggregating SELECT directly above row-level (or unit) scopes. Its
aggregates are those of the language (``language``): COUNT(*), COUNT(column), COUNT of a
condition, COUNT(DISTINCT person / household key), SUM/AVG of a bare measure or of a
measure under conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from sekisho.guard.catalog import DIMENSION, LINKAGE, MEASURE, PRIVACY_UNIT, SENSITIVE, ColumnInfo
from sekisho.guard.checks import BOUNDARY_AGGREGATES
from sekisho.guard.errors import refuse
from sekisho.guard.lineage import column_lineage, lineage_of_expression
from sekisho.guard.scope_checks import check_condition, resolver
from sekisho.guard.sqltext import DIALECT


@dataclass
class AggregateSpec:
    node: exp.Expression            # the aggregate call inside the boundary SELECT
    kind: str                       # count_rows | count_nonnull | count_persons | count_households | sum | avg
    arg: exp.Expression | None      # argument evaluated per row (None for COUNT(*))
    cls: str | None = None          # measure | sensitive_measure for sum/avg
    bounds: tuple[float, float] | None = None
    measure: str | None = None      # view.column summed (sum/avg): what the aggregate measures


@dataclass
class GroupKeySpec:
    expr: exp.Expression
    domain: tuple | None            # public domain when the key is a bare dimension declaring one
    label: str
    # the view column when the key is one passed through unchanged (a bare column of the
    # person-level view, also via derived tables): the key's type is that column's stored
    # type (``catalog.arrow_type``), known without asking the engine
    column: ColumnInfo | None = None


@dataclass
class BoundarySpec:
    select: exp.Select
    personal_view: str
    group_keys: list[GroupKeySpec]
    aggregates: list[AggregateSpec]
    filtered: bool                  # WHERE or a join restricts the population
    unit: bool = False              # aggregates unit rows (one per linkage key), not person rows
    household: bool = False         # person rows carrying household facts: households are the contributors
    join_one_row: bool = False      # joined on keys, one row per person by the policy's declarations
    join_groups: int | None = None  # joined on keys, one row per person per cell, in at most this many cells


def boundary_spec(select: exp.Select, env, view: str) -> BoundarySpec:
    # ORDER BY / LIMIT / HAVING of the boundary run in post-processing, on protected cells
    group = select.args.get("group")
    keys: list[GroupKeySpec] = []
    if group is not None:
        if group.args.get("all"):
            raise refuse("syntax_not_allowed", group)
        for item in group.expressions:
            lineage = lineage_of_expression(item, env)
            domain, column = None, None
            if isinstance(item, exp.Column) and lineage.base is not None:
                column = lineage.base
                if lineage.cls == DIMENSION:
                    domain = lineage.base.domain
                    if domain is not None and lineage.nullable and None not in domain:
                        # a LEFT join's "no match" is a value of the key like any other
                        domain = (*domain, None)
            keys.append(GroupKeySpec(expr=item, domain=domain, label=item.sql(DIALECT), column=column))
    aggregates: list[AggregateSpec] = []
    scan = list(select.expressions)
    if select.args.get("having") is not None:
        scan.append(select.args["having"])
    if select.args.get("order") is not None:
        scan.append(select.args["order"])
    for part in scan:
        for node in part.walk():
            if isinstance(node, exp.AggFunc):
                aggregates.append(aggregate_spec(node, env))
    if not aggregates and group is None:
        raise refuse("row_level_output", select)
    filtered = select.args.get("where") is not None or bool(select.args.get("joins"))
    return BoundarySpec(select=select, personal_view=view, group_keys=keys,
                        aggregates=aggregates, filtered=filtered)


def aggregate_spec(node: exp.AggFunc, env) -> AggregateSpec:
    """The aggregates of the row-level language (see ``sekisho.guard.language``)."""
    if not isinstance(node, BOUNDARY_AGGREGATES):
        raise refuse("aggregate_not_allowed", node)
    for inner in node.find_all(exp.AggFunc):
        if inner is not node:
            raise refuse("aggregate_not_allowed", node)
    if isinstance(node.parent, exp.Filter):
        raise refuse("aggregate_filter", node.parent)
    arg = node.this
    if isinstance(node, exp.Count):
        if arg is None or isinstance(arg, exp.Star):
            return AggregateSpec(node, "count_rows", None)
        if isinstance(arg, exp.Distinct):
            values = arg.expressions
            if len(values) != 1 or not isinstance(values[0], exp.Column):
                raise refuse("aggregate_argument_not_allowed", node)
            lineage = column_lineage(values[0], env)
            if lineage.cls == PRIVACY_UNIT and lineage.nullable:
                # the key of a LEFT-joined view is not the contributor: count the
                # anchor's persons, or INNER JOIN
                raise refuse("aggregate_argument_not_allowed", node)
            if lineage.cls == PRIVACY_UNIT:
                return AggregateSpec(node, "count_persons", values[0])
            if lineage.cls == LINKAGE:
                return AggregateSpec(node, "count_households", values[0])
            raise refuse("aggregate_argument_not_allowed", node)
        if isinstance(arg, exp.Literal) and not isinstance(arg, exp.Null):
            return AggregateSpec(node, "count_rows", None)
        if isinstance(arg, exp.Column):
            if column_lineage(arg, env).cls not in (PRIVACY_UNIT, LINKAGE):
                resolver(env)(arg)
            # COUNT(column) counts the rows where the column is not NULL: written as
            # that condition, so condition influence sees it like any other
            counted = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=arg.copy(), expression=exp.Null())),
                                           true=exp.Literal.number(1))])
            arg.replace(counted)
            return AggregateSpec(node, "count_nonnull", node.this)
        _conditional(arg, env, node, measure=False)
        return AggregateSpec(node, "count_nonnull", arg)
    # SUM / AVG: of a bare measure, or of a measure under conditions
    if arg is None or isinstance(arg, (exp.Distinct, exp.Star)):
        raise refuse("aggregate_argument_not_allowed", node)
    if not isinstance(arg, (exp.Column, exp.Case, exp.If)) and any(
            column_lineage(c, env).cls in (MEASURE, SENSITIVE) for c in arg.find_all(exp.Column)):
        raise refuse("measure_arithmetic", arg)
    measure = arg if isinstance(arg, exp.Column) else _conditional(arg, env, node, measure=True)
    lineage = column_lineage(measure, env)
    if lineage.cls not in (MEASURE, SENSITIVE) or lineage.base is None:
        # SUM(CASE WHEN dimension ... THEN 1 END) is a count of a subgroup that escapes
        # the per-cell threshold (one-hot then mean); arithmetic on a measure can
        # extract its digits: count with GROUP BY, sum a bare measure
        raise refuse("aggregate_argument_not_allowed", node)
    kind = "sum" if isinstance(node, exp.Sum) else "avg"
    return AggregateSpec(node, kind, arg, cls=lineage.cls, bounds=lineage.base.bounds,
                         measure=f"{lineage.base.view}.{lineage.base.name}")


def _conditional(arg: exp.Expression, env, node: exp.AggFunc, *, measure: bool) -> exp.Column | None:
    """``CASE WHEN <condition> THEN <result> [ELSE NULL] END`` (or ``IF``) as an aggregate
    argument: exactly a filter on the aggregate. A count's results are non-NULL
    literals (or NULL); a sum's result is one bare measure column. Returns that column."""
    if isinstance(arg, exp.If):
        branches, default = [arg], arg.args.get("false")
    elif isinstance(arg, exp.Case) and arg.this is None:
        branches, default = list(arg.args.get("ifs") or []), arg.args.get("default")
    else:
        raise refuse("aggregate_argument_not_allowed", node)
    if default is not None and not isinstance(default, exp.Null):
        raise refuse("aggregate_argument_not_allowed", default)
    found = None
    for branch in branches:
        check_condition(branch.this, env)
        result = branch.args.get("true")
        if measure:
            if not isinstance(result, exp.Column) or (found is not None and result != found):
                raise refuse("aggregate_argument_not_allowed", result if result is not None else node)
            found = result
        elif not (isinstance(result, (exp.Literal, exp.Boolean)) and not isinstance(result, exp.Null)):
            raise refuse("aggregate_argument_not_allowed", result if result is not None else node)
    return found
