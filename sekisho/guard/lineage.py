"""What a column is at a scope: the levels of scopes, the classes of columns, and how the
class of an expression follows from the classes of the columns it references.

A bare view column keeps its policy class (``catalog``: privacy unit, linkage,
dimension, measure, sensitive measure) as long as it is passed through unchanged; any
other expression gets a derived class. The classifier keeps, per scope, an environment
``alias -> column -> Lineage`` of its sources (``classify``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from sekisho.guard.catalog import DIMENSION, LINKAGE, MEASURE, PRIVACY_UNIT, SENSITIVE, ColumnInfo
from sekisho.guard.errors import refuse
from sekisho.guard.language import ColumnFacts, column_facts

# levels of scopes (the model of an accepted query: ``analyze``)
PUBLIC, ROW, BOUNDARY, POST = "public", "row", "boundary", "post"
# unit rows: UNIT groups one person-level view by its linkage key (one row per household);
# UNIT_ROW is row-level work (filters, computed features) over unit rows
UNIT, UNIT_ROW = "unit", "unit_row"

# derived column classes (besides the policy classes of bare columns)
DERIVED_DIMENSION = "derived_dimension"
DERIVED_MEASURE = "derived_measure"
DERIVED_SENSITIVE = "derived_sensitive"
CONSTANT = "constant"
AGGREGATED = "aggregated"


@dataclass(frozen=True)
class Lineage:
    """Class of a column as seen by a scope: its policy class if it is a bare view
    column passed through, else a derived class."""
    cls: str
    base: ColumnInfo | None = None
    facts: ColumnFacts | None = None   # type and interval of a derived row-level value
    nullable: bool = False             # a column of a LEFT-joined part (NULL where nothing matched)


def lineage_of_expression(node: exp.Expression, env: dict[str, dict[str, Lineage]]) -> Lineage:
    """Class of an expression from the classes of the columns it references."""
    if isinstance(node, exp.Alias):
        node = node.this
    if isinstance(node, exp.Column):
        return column_lineage(node, env)
    classes = {column_lineage(c, env).cls for c in node.find_all(exp.Column)}
    if not classes:
        return Lineage(CONSTANT)
    if classes & {PRIVACY_UNIT, LINKAGE, "identifier_expression"}:
        return Lineage("identifier_expression")
    if AGGREGATED in classes:
        return Lineage(AGGREGATED)
    measures = classes & {MEASURE, SENSITIVE, DERIVED_MEASURE, DERIVED_SENSITIVE}
    dims = classes & {DIMENSION, DERIVED_DIMENSION}
    if measures and dims:
        return Lineage("mixed")
    if measures:
        sensitive = bool(classes & {SENSITIVE, DERIVED_SENSITIVE})
        return Lineage(DERIVED_SENSITIVE if sensitive else DERIVED_MEASURE)
    if classes & {"identifier_expression", "mixed"}:
        return Lineage("mixed")
    return Lineage(DERIVED_DIMENSION)


IDENTIFIER_CLASSES = (PRIVACY_UNIT, LINKAGE, "identifier_expression")


def mentions_identifier(part: exp.Expression, env) -> bool:
    return any(column_lineage(c, env).cls in IDENTIFIER_CLASSES for c in part.find_all(exp.Column))


def groups_by_identifier(select: exp.Select, env) -> bool:
    group = select.args.get("group")
    return group is not None and any(mentions_identifier(item, env) for item in group.expressions)


def groups_by_linkage(select: exp.Select, env) -> bool:
    group = select.args.get("group")
    return group is not None and any(column_lineage(c, env).cls == LINKAGE
                                     for item in group.expressions for c in item.find_all(exp.Column))


def column_lineage(col: exp.Column, env: dict[str, dict[str, Lineage]]) -> Lineage:
    table = col.table
    source = env.get(table)
    if source is None or col.name not in source:
        raise refuse("unknown_column", col)
    return source[col.name]


def facts_of_column(info: ColumnInfo) -> ColumnFacts:
    return column_facts(info.sql_type, info.domain, month=info.format == "YYYY-MM")


def facts_of_value(value) -> ColumnFacts:
    return ColumnFacts(value.kind, value.lo, value.hi, integral=value.integral)
