"""Static analysis of a query: a tuple of small named passes (sqlglot optimizer style).

(Over 400 lines on purpose: the passes and the scope classifier share one walk of the
qualified tree and the classifier's environment; split, they would pass private state
between modules. A split of the classifier into its own module is the next step.)

Each pass is a function ``(expression, catalog) -> expression`` that either returns the
(possibly rewritten) expression or raises ``QueryRefused``; ``analyze`` applies them in
order and finishes with ``find_boundaries``, which classifies every scope and returns
an ``Analysis``. Nothing here looks at data, so every refusal depends only on the SQL
text and the policy.

Model of an accepted query
--------------------------
Every SELECT scope gets a level:

* ``PUBLIC``  – reads only public views (facilities, areas): anything on the allow-list;
* ``ROW``     – row-level work on one person-level view (optionally joined with public
  views): filters, joins and computed columns over *dimension* columns only; no
  aggregation, window, DISTINCT, ORDER BY/LIMIT, set operation;
* ``BOUNDARY`` – the aggregating SELECT directly above ``ROW`` scopes: only
  COUNT(*), COUNT(expr over dimensions), COUNT(DISTINCT privacy unit / linkage key),
  SUM/AVG of measures; GROUP BY over dimensions; no window, no FILTER, no ROLLUP;
* ``UNIT``    – one row per household: a SELECT over one person-level view (row-level
  filters allowed) that GROUPs BY exactly its linkage key and selects only that key
  and *unit features* — COUNT/SUM/MIN/MAX/COUNT_IF/BOOL_OR/BOOL_AND over dimension-only
  arguments, COUNT(*), COUNT(DISTINCT person id), combined by scalar functions. No
  HAVING, window, DISTINCT, ORDER BY/LIMIT, measures or identifiers in features; no
  nesting. ``UNIT_ROW`` is row-level work over unit rows (filters, computed features);
* a *unit boundary* is the aggregating SELECT over unit rows: COUNT(*) and
  COUNT(DISTINCT linkage key) only, grouped by expressions over unit features; the
  linkage key is never a group key, a filter operand or an output there. The unit is
  its contributor (``rewrite`` carries the linkage key as ``__pid`` and SUM(member
  ``_rkey``) mod 256 as ``__rkey``), so k is counted in households;
* ``POST``    – everything above boundaries: reads only aggregated (protected) or
  public results, so it is post-processing and may use any allowed function.

Decisions (documented because the brief leaves them open):

* Measures never appear in WHERE/JOIN/GROUP BY of row-level scopes, not even as
  bands: ``WHERE taxable_income = 12345678`` isolates a person. Banded income needs
  policy-declared bands (not implemented).
* Only one person-level view per boundary; joins are INNER or LEFT with the
  person-level view on the left, joined to public views on dimension columns.
* Subqueries inside expressions (IN, EXISTS, scalar) are refused everywhere; joins of
  aggregated results express the same thing safely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, OptimizeError, ParseError, SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

from sekisho.guard.catalog import DIMENSION, LINKAGE, MEASURE, PRIVACY_UNIT, SENSITIVE, Catalog, ColumnInfo
from sekisho.guard.errors import QueryRefused, refuse
from sekisho.guard import idioms, joins
from sekisho.guard.language import ColumnFacts, RowLanguage, check_limits, column_facts, widen_operands

DIALECT = "duckdb"
MAX_SQL_CHARS = 100_000
MAX_NODES = 20_000

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


# ---- result -----------------------------------------------------------------------
@dataclass(frozen=True)
class Lineage:
    """Class of a column as seen by a scope: its policy class if it is a bare view
    column passed through, else a derived class."""
    cls: str
    base: ColumnInfo | None = None
    facts: ColumnFacts | None = None   # type and interval of a derived row-level value
    nullable: bool = False             # a person key of a LEFT-joined view (NULL where nothing matched)


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


# ---- passes -----------------------------------------------------------------------
def parse_single_select(sql: str) -> exp.Expression:
    """Parse exactly one SELECT (or set operation of SELECTs) in the DuckDB dialect."""
    if not isinstance(sql, str):
        raise QueryRefused("parse_error", part=type(sql).__name__)
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRefused("too_complex", part=sql[:80])
    if "\x00" in sql:
        raise QueryRefused("parse_error", part="NUL character")
    try:
        statements = [s for s in sqlglot.parse(sql, read=DIALECT, error_level=ErrorLevel.RAISE) if s is not None]
    except (ParseError, SqlglotError, RecursionError, ValueError, TypeError, KeyError, IndexError,
            AttributeError) as exc:
        part = ""
        errors = getattr(exc, "errors", None)
        if errors:
            part = str(errors[0].get("highlight") or "")
        raise QueryRefused("parse_error", part=part or sql[:80]) from None
    if not statements:
        raise QueryRefused("empty_query")
    if len(statements) > 1:
        raise refuse("multiple_statements", statements[1])
    tree = statements[0]
    if not isinstance(tree, (exp.Select, exp.SetOperation)):
        raise refuse("not_a_select", part=sql.strip().split(None, 1)[0] if sql.strip() else "")
    if sum(1 for _ in tree.walk()) > MAX_NODES:
        raise QueryRefused("too_complex", part=sql[:80])
    return tree


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
        # (EXISTS on the key becomes a SEMI JOIN, ``joins.semi_joins``; any other
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


def qualify_columns(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Qualify every column against the role's visible schema (``_rkey`` is never in it),
    expanding stars and positional GROUP BY / ORDER BY references.

    ``qualify`` folds every identifier to lower case (DuckDB resolves names without
    regard to case, quoted or not), which is how names are resolved here too; but DuckDB
    *keeps* the spelling of the names a query defines in its result columns
    (``AS "N"``, ``AS Total``). So the spelling of every output name the analyst wrote is
    put back afterwards (``_restore_output_names``); names of views, their columns and
    table aliases stay folded."""
    _remember_output_names(tree)
    try:
        tree = qualify(tree, schema=catalog.sqlglot_schema(DIALECT), dialect=DIALECT, validate_qualify_columns=True,
                       identify=True, quote_identifiers=True, isolate_tables=False)
    except OptimizeError as exc:
        message = str(exc)
        code = "unknown_column" if "olumn" in message else "unknown_view" if "able" in message else "syntax_not_allowed"
        raise QueryRefused(code, part=message[:200]) from None
    except (SqlglotError, RecursionError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise QueryRefused("syntax_not_allowed", part=str(exc)[:200]) from None
    try:
        _restore_output_names(tree)
    except (OptimizeError, SqlglotError, RecursionError, KeyError, AttributeError, ValueError) as exc:
        raise QueryRefused("syntax_not_allowed", part=str(exc)[:200]) from None
    return tree


# meta keys: an alias as the analyst spelled it; a derived table's column list (AS s(a, b))
_SPELLING, _COLUMN_LIST = "sekisho_spelling", "sekisho_column_list"


def _branches(body: exp.Expression):
    """The SELECTs whose projections name the columns of ``body`` (every branch of a
    set operation: ``qualify`` pushes a column list into each of them)."""
    while isinstance(body, exp.Subquery):
        body = body.this
    if isinstance(body, exp.SetOperation):
        yield from _branches(body.this)
        yield from _branches(body.expression)
    elif isinstance(body, exp.Select):
        yield body


def _remember_output_names(tree: exp.Expression) -> None:
    """Before ``qualify`` folds them: note how the analyst spelled each alias, and each
    column list of a derived table or CTE (which ``qualify`` moves into its SELECTs)."""
    for node in tree.walk():
        if isinstance(node, exp.Alias):
            ident = node.args.get("alias")
            if isinstance(ident, exp.Identifier):
                ident.meta[_SPELLING] = ident.name
        elif isinstance(node, exp.TableAlias) and node.columns and isinstance(node.parent, (exp.Subquery, exp.CTE)):
            names = [c.name for c in node.columns]
            for select in _branches(node.parent.this):
                select.meta[_COLUMN_LIST] = names


def _restore_output_names(tree: exp.Expression) -> None:
    """Spell every output name of every scope as DuckDB names the result column: an
    alias (or column list entry) as written; a column passed up from a derived table or
    CTE as that source spelled it; a view column as the view declares it. References
    to such names (``s.total``, ``ORDER BY TOTAL``) take the same spelling, so the
    classifier and the rewrite, which compare names exactly, see one name. When two
    outputs differ only in case, a reference means the first, as in DuckDB."""
    spelled: dict[int, dict[str, str]] = {}     # scope expression -> folded name -> spelling
    for scope in traverse_scope(tree):
        expression = scope.expression
        if isinstance(expression, exp.SetOperation):
            left = next(_branches(expression), None)
            names = spelled.get(id(left), {}) if left is not None else {}
            spelled[id(expression)] = names
            order = expression.args.get("order")
            if order is not None:
                _respell_references(order, {}, names)
            continue
        if not isinstance(expression, exp.Select):
            continue
        provided: dict[str, dict[str, str]] = {}  # source alias -> folded name -> spelling
        for alias, (_, source) in scope.selected_sources.items():
            if isinstance(source, Scope):
                provided[alias] = spelled.get(id(source.expression), {})
        column_list = expression.meta.get(_COLUMN_LIST) or []
        names: dict[str, str] = {}
        for i, projection in enumerate(expression.expressions):
            ident = projection.args.get("alias") if isinstance(projection, exp.Alias) else None
            if not isinstance(ident, exp.Identifier):
                continue
            folded, spelling = ident.name, ident.meta.get(_SPELLING)
            if i < len(column_list):
                spelling = column_list[i]
            elif spelling is None and isinstance(projection.this, exp.Column):
                spelling = provided.get(projection.this.table, {}).get(projection.this.name)
            if spelling is not None:
                ident.set("this", spelling)
            names.setdefault(folded, ident.name)
        spelled[id(expression)] = names
        for projection in expression.expressions:
            _respell_references(projection.this if isinstance(projection, exp.Alias) else projection, provided, {})
        for clause in ("joins", "where", "group", "having", "qualify", "order", "windows"):
            part = expression.args.get(clause)
            for item in (part if isinstance(part, list) else [part] if part is not None else []):
                _respell_references(item, provided, names)


def _respell_references(part: exp.Expression, provided: dict[str, dict[str, str]], own: dict[str, str]) -> None:
    """Spell the columns of ``part`` (not those of nested SELECTs) as their sources do:
    ``s.x`` as derived table ``s`` spelled its output, a bare ``x`` (an ORDER BY
    reference to an output) as this scope spelled it."""
    for node in part.walk(prune=lambda n: isinstance(n, (exp.Select, exp.Subquery, exp.SetOperation))):
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            continue
        names = provided.get(node.table) if node.table else own
        if names and node.name in names:
            node.this.set("this", names[node.name])


def inline_ctes(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Replace references to CTEs by the CTE bodies as derived tables, so that each
    use of a CTE is analysed (and rewritten) in its own place."""
    for _ in range(256):
        withs = list(tree.find_all(exp.With))
        if not withs:
            return tree
        with_ = withs[-1]  # innermost (deepest) first
        owner = with_.parent
        ctes = list(with_.expressions)
        with_.pop()
        for i, cte in enumerate(ctes):
            name = cte.alias_or_name
            body = cte.this
            # a CTE used twice by a CTE used twice ... doubles at each level: every body
            # (with what was inlined into it) is bounded like a parsed query, before it
            # is copied anywhere
            size, copied = sum(1 for _ in body.walk()), 0
            for target in [c.this for c in ctes[i + 1:]] + [owner]:
                for table in list(target.find_all(exp.Table)):
                    if table.name == name and not table.args.get("db"):
                        copied += size
                        if copied > MAX_NODES:
                            raise QueryRefused("too_complex", part=f"WITH {name}")
                        alias = table.alias_or_name
                        table.replace(exp.Subquery(
                            this=body.copy(),
                            alias=exp.TableAlias(this=exp.to_identifier(alias, quoted=True))))
    raise QueryRefused("too_complex", part="WITH")


def parenthesise_integer_division(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """``a // b`` in parentheses: DuckDB binds ``//`` more loosely than a comparison, so
    ``x // 12 < 15`` written back without them would run as ``x // (12 < 15)``."""
    for node in list(tree.find_all(exp.IntDiv)):
        if not isinstance(node.parent, exp.Paren):
            node.replace(exp.Paren(this=node.copy()))
    return tree


PASSES = (
    idioms.conditional_aggregates,   # before the checks: they see the language's forms
    check_forbidden_syntax,
    check_functions,
    check_tables,
    qualify_columns,
    inline_ctes,
    joins.semi_joins,
    parenthesise_integer_division,
)


# ---- scope classification ------------------------------------------------------------
def _lineage_of_expression(node: exp.Expression, env: dict[str, dict[str, Lineage]]) -> Lineage:
    """Class of an expression from the classes of the columns it references."""
    if isinstance(node, exp.Alias):
        node = node.this
    if isinstance(node, exp.Column):
        return _column_lineage(node, env)
    classes = {_column_lineage(c, env).cls for c in node.find_all(exp.Column)}
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


def _mentions_identifier(part: exp.Expression, env) -> bool:
    return any(_column_lineage(c, env).cls in IDENTIFIER_CLASSES for c in part.find_all(exp.Column))


def _groups_by_identifier(select: exp.Select, env) -> bool:
    group = select.args.get("group")
    return group is not None and any(_mentions_identifier(item, env) for item in group.expressions)


def _groups_by_linkage(select: exp.Select, env) -> bool:
    group = select.args.get("group")
    return group is not None and any(_column_lineage(c, env).cls == LINKAGE
                                     for item in group.expressions for c in item.find_all(exp.Column))


def _unit_count(node: exp.AggFunc, env) -> bool:
    """COUNT(*) or COUNT(DISTINCT linkage key): the only ways to count unit rows."""
    if not isinstance(node, exp.Count):
        return False
    arg = node.this
    if arg is None or isinstance(arg, exp.Star):
        return True
    if isinstance(arg, exp.Distinct) and len(arg.expressions) == 1 and isinstance(arg.expressions[0], exp.Column):
        return _column_lineage(arg.expressions[0], env).cls == LINKAGE
    return False


def _owned_by(node: exp.Expression, select: exp.Select) -> bool:
    """``node`` belongs to ``select`` itself, not to a nested SELECT."""
    parent = node.parent
    while parent is not None and parent is not select:
        if isinstance(parent, (exp.Select, exp.SetOperation)):
            return False
        parent = parent.parent
    return parent is select


def _check_unit_feature(expression: exp.Expression, env, part: exp.Expression) -> None:
    """The shape of a unit feature: only unit aggregates (COUNT, SUM, MIN, MAX, COUNT_IF,
    BOOL_OR, BOOL_AND), none nested or windowed. Their arguments and what combines them
    are checked by the row-level language (``RowLanguage`` with ``unit_resolve``)."""
    for node in expression.walk():
        if not isinstance(node, exp.AggFunc):
            continue
        if not isinstance(node, UNIT_AGGREGATES) or _inside_window(node, expression):
            raise refuse("unit_scope_not_allowed", node)
        for inner in node.find_all(exp.AggFunc):
            if inner is not node:
                raise refuse("unit_scope_not_allowed", node)


def _column_lineage(col: exp.Column, env: dict[str, dict[str, Lineage]]) -> Lineage:
    table = col.table
    source = env.get(table)
    if source is None or col.name not in source:
        raise refuse("unknown_column", col)
    return source[col.name]


def _is_aggregate_scope(select: exp.Select) -> bool:
    if select.args.get("group"):
        return True
    for projection in select.expressions:
        for node in projection.walk():
            if isinstance(node, exp.AggFunc) and not _inside_window(node, projection):
                return True
    having = select.args.get("having")
    return having is not None


def _inside_window(node: exp.Expression, stop: exp.Expression) -> bool:
    parent = node.parent
    while parent is not None and parent is not stop.parent:
        if isinstance(parent, exp.Window):
            return True
        parent = parent.parent
    return False


def _own_nodes(select: exp.Select):
    """Nodes of this SELECT excluding nested SELECTs/derived tables."""
    for node in select.walk(prune=lambda n: n is not select and isinstance(n, (exp.Select, exp.Subquery, exp.SetOperation))):
        if node is not select and isinstance(node, (exp.Select, exp.Subquery, exp.SetOperation)):
            continue
        yield node


def _facts_of_column(info: ColumnInfo) -> ColumnFacts:
    return column_facts(info.sql_type, info.domain, month=info.format == "YYYY-MM")


def _facts_of_value(value) -> ColumnFacts:
    return ColumnFacts(value.kind, value.lo, value.hi, integral=value.integral)


class _Classifier:
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
                    env[alias] = {c: Lineage(DERIVED_DIMENSION, facts=_facts_of_column(info))
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
                                 public=PUBLIC, condition=lambda node: self._condition(node, env),
                                 column_lineage=_column_lineage)
        linked = {j.this.alias_or_name for j in expression.args.get("joins") or []
                  if info is not None and id(j) in info.handled}
        source_levels = [lvl for a, lvl, _ in sources if a not in linked]
        personal = [(a, s) for a, lvl, s in sources if lvl == ROW and a not in linked]
        aggregate = _is_aggregate_scope(expression)

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
        self._check_joins(expression, personal_alias, env, handled=info.handled if info is not None else ())
        view = (personal_source.name if isinstance(personal_source, exp.Table)
                else self.personal_view[id(personal_source.expression)])
        self.personal_view[key] = view
        if info is not None:
            self.row_info[key] = info
        if aggregate and _groups_by_linkage(expression, env):
            if info is not None and info.person_joins:
                # a unit's features from joined person rows: each member once (no fan-out),
                # and only the member's own rows (no other household's facts)
                if info.household:
                    raise refuse("unit_scope_not_allowed", expression.args["joins"][0])
                if info.multi or info.per_cell:
                    several = info.multi | info.per_cell
                    raise joins.fan_out(self.catalog, several, ", ".join(sorted(several)))
            self.outputs[key] = self._unit_scope(expression, env)
            self.levels[key] = UNIT
            return
        self._check_row_clauses(expression, env)
        if aggregate:
            self.levels[key] = BOUNDARY
            self._widen(expression, env)
            spec = self._boundary(expression, env, view)
            if info is not None:
                joins.check_measures(spec.aggregates, info, self.catalog)
                spec.household = info.household
                spec.join_one_row = info.person_joins and not (info.multi or info.per_cell or info.public_join
                                                               or info.household)
                if info.household:
                    # the household is the contributor: a count of distinct persons is a
                    # distinct count of its argument, not of contributors
                    for agg in spec.aggregates:
                        if agg.kind == "count_persons":
                            agg.kind = "count_households"
            self.boundaries.append(spec)
            self.outputs[key] = {sel.alias_or_name: Lineage(AGGREGATED) for sel in expression.expressions}
        else:
            self._check_row_scope(expression, env)
            self.levels[key] = ROW
            self.outputs[key] = {sel.alias_or_name: self._row_output(
                sel.this if isinstance(sel, exp.Alias) else sel, _lineage_of_expression(sel, env), env)
                for sel in expression.expressions}
            self._widen(expression, env)

    # -- unit rows: one row per linkage key (household), features aggregated over members
    def _unit_scope(self, select: exp.Select, env) -> dict[str, Lineage]:
        """Check a unit scope and return its outputs: the linkage key, and unit features
        (aggregates over dimension-only expressions of the unit's members)."""
        items = select.args["group"].expressions
        if len(items) != 1 or not isinstance(items[0], exp.Column) \
                or _column_lineage(items[0], env).cls != LINKAGE:
            raise refuse("unit_scope_not_allowed", select.args["group"])
        key = items[0]
        for clause in ("having", "order", "limit", "offset", "distinct", "qualify"):
            if select.args.get(clause):
                raise refuse("unit_scope_not_allowed", select.args[clause])
        where = select.args.get("where")
        if where is not None:
            self._condition(where.this, env)
        for node in _own_nodes(select):
            if isinstance(node, (exp.Window, exp.Qualify)):
                raise refuse("window_below_boundary", node)
            if isinstance(node, exp.Filter):
                raise refuse("aggregate_filter", node)
        outputs: dict[str, Lineage] = {}
        for projection in select.expressions:
            inner = projection.this if isinstance(projection, exp.Alias) else projection
            if isinstance(inner, exp.Column) and inner.table == key.table and inner.name == key.name:
                outputs[projection.alias_or_name] = _column_lineage(inner, env)
                continue
            _check_unit_feature(inner, env, projection)
            check_limits(inner, projection)

            def outside_aggregate(col: exp.Column, part=projection) -> ColumnFacts:
                raise refuse("unit_scope_not_allowed", part)   # every member column sits inside an aggregate
            try:
                value = RowLanguage(outside_aggregate, unit_resolve=self._resolver(env)).value(inner)
            except QueryRefused as refusal:
                if refusal.code in ("privacy_unit_in_filter", "measure_in_filter"):
                    # an identifier or measure inside a feature: the feature's shape is wrong
                    raise refuse("unit_scope_not_allowed", projection) from None
                raise
            outputs[projection.alias_or_name] = Lineage(DERIVED_DIMENSION, facts=_facts_of_value(value))
        self._widen(select, env)
        return outputs

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
        if group is not None and _groups_by_identifier(select, env):
            items = group.expressions
            nested = len(items) == 1 and isinstance(items[0], exp.Column)
            raise refuse("unit_scope_nested" if nested else "linkage_key_output", group)
        for clause in ("where", "having"):
            part = select.args.get(clause)
            if part is not None and _mentions_identifier(part, env):
                raise refuse("linkage_key_output", part)
        for join in select.args.get("joins") or []:
            if _mentions_identifier(join, env):
                raise refuse("linkage_key_output", join)
        self._check_joins(select, unit_alias, env)
        self._check_row_clauses(select, env)
        view = self.personal_view[id(unit_source.expression)]
        self.personal_view[key] = view
        if aggregate:
            for node in select.find_all(exp.AggFunc):
                if _owned_by(node, select) and not _unit_count(node, env):
                    raise refuse("unit_aggregate_not_allowed", node)
            self._widen(select, env)
            spec = self._boundary(select, env, view)
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
            lineage = _lineage_of_expression(inner, env)
            if lineage.cls == "identifier_expression":
                raise refuse("linkage_key_output", projection)
            outputs[projection.alias_or_name] = self._row_output(inner, lineage, env)
        self._widen(select, env)
        self.levels[key] = UNIT_ROW
        self.outputs[key] = outputs

    # -- checks shared by row scopes and boundaries
    def _check_joins(self, select: exp.Select, personal_alias: str, env, handled=()) -> None:
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
            self._condition(on, env)

    def _check_row_clauses(self, select: exp.Select, env) -> None:
        where = select.args.get("where")
        if where is not None:
            self._condition(where.this, env)
        group = select.args.get("group")
        if group is not None:
            for item in group.expressions:
                self._value(item, env)
        for node in _own_nodes(select):
            if isinstance(node, exp.Window):
                raise refuse("window_below_boundary", node)
            if isinstance(node, exp.Filter):
                raise refuse("aggregate_filter", node)
            if isinstance(node, exp.Qualify):
                raise refuse("window_below_boundary", node)

    # -- the row-level language (sekisho.guard.language)
    def _resolver(self, env):
        """Facts of a column as a row-level operand: dimensions only (identifiers and
        measures may not decide whether a row counts or where it lands)."""
        def resolve(col: exp.Column) -> ColumnFacts:
            lineage = _column_lineage(col, env)
            if lineage.cls in IDENTIFIER_CLASSES:
                raise refuse("privacy_unit_in_filter", col)
            if lineage.cls in (MEASURE, SENSITIVE, DERIVED_MEASURE, DERIVED_SENSITIVE, "mixed"):
                raise refuse("measure_in_filter", col)
            if lineage.cls == AGGREGATED:
                raise refuse("nested_aggregation", col)
            if lineage.facts is not None:
                return lineage.facts
            if lineage.base is not None:
                return _facts_of_column(lineage.base)
            return ColumnFacts("unknown")
        return resolve

    def _condition(self, node: exp.Expression, env) -> None:
        check_limits(node)
        RowLanguage(self._resolver(env)).condition(node)

    def _value(self, node: exp.Expression, env):
        check_limits(node)
        return RowLanguage(self._resolver(env)).value(node)

    def _row_output(self, inner: exp.Expression, lineage: Lineage, env) -> Lineage:
        """A row-level projection: a bare column passes through with its class (an
        identifier for COUNT(DISTINCT), a measure for SUM/AVG above); anything else is a
        value of the language, over dimensions only."""
        if isinstance(inner, exp.Column):
            return lineage
        return Lineage(DERIVED_DIMENSION, facts=_facts_of_value(self._value(inner, env)))

    def _widen(self, select: exp.Select, env) -> None:
        resolve = self._resolver(env)

        def facts_of(col: exp.Column) -> ColumnFacts | None:
            try:
                return resolve(col)
            except QueryRefused:
                return None
        widen_operands(_own_nodes(select), facts_of)

    def _check_row_scope(self, select: exp.Select, env) -> None:
        if select.args.get("distinct"):
            raise refuse("distinct_rows", select.args["distinct"])
        for clause in ("order", "limit", "offset"):
            if select.args.get(clause) is not None:
                raise refuse("limit_below_boundary", select.args[clause])
        for projection in select.expressions:
            inner = projection.this if isinstance(projection, exp.Alias) else projection
            lineage = _lineage_of_expression(inner, env)
            if lineage.cls == "identifier_expression":
                raise refuse("privacy_unit_in_expression", projection)
            if lineage.cls == "mixed":
                raise refuse("measure_mixed_with_dimension", projection)
            if lineage.cls in (DERIVED_MEASURE, DERIVED_SENSITIVE):
                raise refuse("measure_arithmetic", projection)

    # -- the boundary
    def _boundary(self, select: exp.Select, env, view: str) -> BoundarySpec:
        # ORDER BY / LIMIT / HAVING of the boundary run in post-processing, on protected cells
        group = select.args.get("group")
        keys: list[GroupKeySpec] = []
        if group is not None:
            if group.args.get("all"):
                raise refuse("syntax_not_allowed", group)
            for item in group.expressions:
                lineage = _lineage_of_expression(item, env)
                domain, column = None, None
                if isinstance(item, exp.Column) and lineage.base is not None:
                    column = lineage.base
                    if lineage.cls == DIMENSION:
                        domain = lineage.base.domain
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
                    aggregates.append(self._aggregate(node, env))
        if not aggregates and group is None:
            raise refuse("row_level_output", select)
        filtered = select.args.get("where") is not None or bool(select.args.get("joins"))
        return BoundarySpec(select=select, personal_view=view, group_keys=keys,
                            aggregates=aggregates, filtered=filtered)

    def _aggregate(self, node: exp.AggFunc, env) -> AggregateSpec:
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
                lineage = _column_lineage(values[0], env)
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
                if _column_lineage(arg, env).cls not in (PRIVACY_UNIT, LINKAGE):
                    self._resolver(env)(arg)
                # COUNT(column) counts the rows where the column is not NULL: written as
                # that condition, so condition influence sees it like any other
                counted = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=arg.copy(), expression=exp.Null())),
                                               true=exp.Literal.number(1))])
                arg.replace(counted)
                return AggregateSpec(node, "count_nonnull", node.this)
            self._conditional(arg, env, node, measure=False)
            return AggregateSpec(node, "count_nonnull", arg)
        # SUM / AVG: of a bare measure, or of a measure under conditions
        if arg is None or isinstance(arg, (exp.Distinct, exp.Star)):
            raise refuse("aggregate_argument_not_allowed", node)
        if not isinstance(arg, (exp.Column, exp.Case, exp.If)) and any(
                _column_lineage(c, env).cls in (MEASURE, SENSITIVE) for c in arg.find_all(exp.Column)):
            raise refuse("measure_arithmetic", arg)
        measure = arg if isinstance(arg, exp.Column) else self._conditional(arg, env, node, measure=True)
        lineage = _column_lineage(measure, env)
        if lineage.cls not in (MEASURE, SENSITIVE) or lineage.base is None:
            # SUM(CASE WHEN dimension ... THEN 1 END) is a count of a subgroup that escapes
            # the per-cell threshold (one-hot then mean); arithmetic on a measure can
            # extract its digits: count with GROUP BY, sum a bare measure
            raise refuse("aggregate_argument_not_allowed", node)
        kind = "sum" if isinstance(node, exp.Sum) else "avg"
        return AggregateSpec(node, kind, arg, cls=lineage.cls, bounds=lineage.base.bounds,
                             measure=f"{lineage.base.view}.{lineage.base.name}")

    def _conditional(self, arg: exp.Expression, env, node: exp.AggFunc, *, measure: bool) -> exp.Column | None:
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
            self._condition(branch.this, env)
            result = branch.args.get("true")
            if measure:
                if not isinstance(result, exp.Column) or (found is not None and result != found):
                    raise refuse("aggregate_argument_not_allowed", result if result is not None else node)
                found = result
            elif not (isinstance(result, (exp.Literal, exp.Boolean)) and not isinstance(result, exp.Null)):
                raise refuse("aggregate_argument_not_allowed", result if result is not None else node)
        return found


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


def fingerprint(tree: exp.Expression, *, fold_case: bool = False) -> tuple[str, str]:
    """sqlglot-normalised SQL with literals masked, and its digest: near-identical queries
    (same shape, different constants) share a fingerprint. ``fold_case``: identifiers in
    lower case, as DuckDB resolves them — for a qualified tree, whose output names keep
    the analyst's spelling, so ``AS Total`` and ``AS total`` share a fingerprint."""
    masked = tree.copy()
    for literal in list(masked.find_all(exp.Literal)):
        literal.replace(exp.Placeholder())
    if fold_case:
        masked = normalize_identifiers(masked, dialect=DIALECT)
    text = masked.sql(dialect=DIALECT, normalize=True)
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def analyze(sql: str, catalog: Catalog, passes=PASSES) -> Analysis:
    """Run every pass; return the classified query or raise ``QueryRefused``."""
    tree = parse_single_select(sql)
    for check in passes:
        tree = check(tree, catalog)
    return find_boundaries(tree, catalog)
