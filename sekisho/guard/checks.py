"""The syntax checks: allow-lists of functions and aggregates, syntax refused wherever it
appears, and table references (visible views by bare name, or CTEs).

These passes look at nodes one by one, before names are resolved; where a function or
aggregate may appear (row level, boundary, unit, post-processing) is decided when the
scopes are classified (``classify``), from the lists defined here.
"""

from __future__ import annotations

from sqlglot import exp

from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import refuse

# ---- allow-lists ------------------------------------------------------------------
# Scalar functions allowed anywhere (row level and post-processing).
SCALAR_FUNCTIONS: tuple[type, ...] = tuple(getattr(exp, n) for n in (
    "Cast", "TryCast", "Case", "If", "Coalesce", "Nullif", "Abs", "Round", "Floor", "Ceil",
    "Least", "Greatest", "Sqrt", "Ln", "Log", "Pow", "Exp", "Sign", "SafeDivide",
    "Concat", "ConcatWs", "Upper", "Lower", "Length", "Substring", "Trim", "Left", "Right",
    "Lpad", "Rpad", "StartsWith", "EndsWith", "StrPosition", "Replace", "Contains",
    "Extract", "Year", "Month", "Day", "Quarter", "DayOfWeek", "DateTrunc", "TimestampTrunc",
    "StrToDate", "StrToTime", "TimeToStr", "DateAdd", "DateSub", "DateDiff", "CurrentDate",
    "IntDiv", "Trunc", "Bracket", "Struct",
) if hasattr(exp, n))
# Aggregates allowed at a boundary over person-level rows (their arguments are checked).
BOUNDARY_AGGREGATES: tuple[type, ...] = (exp.Count, exp.Sum, exp.Avg)
# Aggregates allowed in post-processing and on public views (inputs are protected/public).
POST_AGGREGATES: tuple[type, ...] = tuple(getattr(exp, n) for n in (
    "Count", "Sum", "Avg", "Min", "Max", "Stddev", "StddevPop", "StddevSamp", "Variance",
    "VariancePop", "Median", "Quantile", "ApproxQuantile", "PercentileCont", "PercentileDisc",
    "AnyValue", "First", "Last", "ArrayAgg", "GroupConcat", "CountIf", "SumIf",
) if hasattr(exp, n))
# Aggregates allowed in a unit scope, over dimension-only arguments (features of a unit).
UNIT_AGGREGATES: tuple[type, ...] = tuple(getattr(exp, n) for n in (
    "Count", "Sum", "Min", "Max", "CountIf", "LogicalOr", "LogicalAnd",
) if hasattr(exp, n))
WINDOW_FUNCTIONS: tuple[type, ...] = tuple(getattr(exp, n) for n in (
    "RowNumber", "Rank", "DenseRank", "PercentRank", "CumeDist", "Ntile", "Lag", "Lead",
    "FirstValue", "LastValue", "NthValue",
) if hasattr(exp, n))
# Syntax refused wherever it appears.
FORBIDDEN_NODES: tuple[type, ...] = tuple(getattr(exp, n) for n in (
    "Placeholder", "Parameter", "SessionParameter", "Lateral", "Unnest", "Pivot", "TableSample",
    "Into", "Command", "Pragma", "Set", "Copy", "Attach", "Detach", "Install", "Use",
    "Create", "Drop", "Insert", "Update", "Delete", "Merge", "Alter", "Describe", "Show",
    "Transaction", "Commit", "Rollback", "Cube", "Rollup", "GroupingSets", "Connect", "Prior",
    "MatchRecognize", "Lambda", "Fetch", "Values", "Hint", "JSONTable", "XMLTable",
) if hasattr(exp, n))


def check_forbidden_syntax(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Refuse parameters, LATERAL/UNNEST, PIVOT, TABLESAMPLE, INTO, ROLLUP/CUBE, DDL/DML
    nodes nested anywhere, and recursive CTEs."""
    for node in tree.walk():
        if isinstance(node, exp.Identifier) and str(node.this).startswith("__"):
            # names starting with __ are the guard's own (__pid, __rkey, __b0, ...): an
            # analyst alias must never shadow the privacy unit or the record key
            raise refuse("reserved_name", node)
        if isinstance(node, (exp.Cube, exp.Rollup, exp.GroupingSets)):
            raise refuse("grouping_sets", node)
        if isinstance(node, (exp.Placeholder, exp.Parameter)) or type(node).__name__ == "SessionParameter":
            raise refuse("parameter_placeholder", node)
        if isinstance(node, FORBIDDEN_NODES):
            raise refuse("syntax_not_allowed", node)
        if isinstance(node, exp.With) and node.args.get("recursive"):
            raise refuse("recursive_cte", node)
        if isinstance(node, exp.Group) and (node.args.get("all") or node.args.get("totals")):
            if node.args.get("totals"):
                raise refuse("grouping_sets", node)
        if isinstance(node, exp.Select) and node.find_ancestor(exp.Subquery, exp.CTE) is not None:
            # a reference to a name a derived table outputs twice is resolved by DuckDB to
            # the first and could be read otherwise by the analysis: refused, not guessed
            seen: set[str] = set()
            for projection in node.expressions:
                name = projection.alias_or_name.lower() if not isinstance(projection, exp.Star) else ""
                if name and name != "*" and name in seen:
                    raise refuse("duplicate_output_name", projection)
                seen.add(name)
    return tree


def check_functions(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Every function must be on an allow-list; unknown (anonymous) functions, file
    readers, catalog/system functions, random() and UDFs are refused."""
    allowed = SCALAR_FUNCTIONS + POST_AGGREGATES + UNIT_AGGREGATES + WINDOW_FUNCTIONS
    for node in tree.walk():
        # (EXISTS on the key becomes a SEMI JOIN, ``semi_joins``; any other
        # subquery in an expression is refused when its scope is classified)
        if isinstance(node, exp.Func) and not isinstance(node, allowed) and not isinstance(node, exp.Exists):
            # sqlglot >= 28 makes AND/OR/XOR (exp.Connector) Func subclasses; they are operators
            if isinstance(node, (exp.Table, exp.Connector)):
                continue
            raise refuse("function_not_allowed", node)
    return tree


def check_tables(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Every table reference is a visible view by bare name (or a CTE): no schema or
    catalog prefix, no string paths (``FROM 'file.csv'``), no table functions."""
    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for table in tree.find_all(exp.Table):
        target = table.this
        if not isinstance(target, exp.Identifier):
            raise refuse("table_function", table)
        if table.args.get("db") or table.args.get("catalog"):
            raise refuse("unknown_view", table)
        name = target.name
        if name in cte_names or name.lower() in cte_names:
            continue
        if name not in catalog.views:
            raise refuse("unknown_view", table)
    return tree
