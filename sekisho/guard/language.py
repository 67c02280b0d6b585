"""The row-level language: what the guard accepts below an aggregation boundary.

(Over 400 lines on purpose: the allow-list is one reviewable place — every accepted form
with its static interval rule — so that what the guard accepts can be read in one file.)

Every expression that decides whether a row counts or where it lands — a filter, a join
condition, a group key, an aggregate's argument, a household (unit) feature — must be one
the guard can fully analyse, because the condition-influence rule
(``sekisho.guard.influence``) can only neutralise conditions it can see, and because a
function that fails for one value turns "answered / refused" into a one-bit oracle. The
language is an *allow-list* of forms (Open Diffix Elm and SmartNoise SQL restrict their
SQL for the same reason); anything else is refused with ``expression_not_allowed``,
naming the offending part.

Values (over dimension columns, typed ``num`` / ``str`` / ``bool``):

* a column, a literal, ``-v``, parentheses;
* integer arithmetic ``+ - *`` and ``/ // %`` by a non-zero numeric literal — each value
  carries a static interval (from the column's declared domain, else its stored type),
  and arithmetic is accepted only while every intermediate interval stays within
  ±2**53, so no accepted expression can overflow, whatever the data (columns in
  arithmetic are computed as BIGINT, see ``render_total``);
* the year and month parts of a ``YYYY-MM`` month column:
  ``CAST(SUBSTRING(col, 1, 4) AS INTEGER)`` and ``CAST(SUBSTRING(col, 6, 2) AS INTEGER)``
  (also ``SUBSTRING(col, 1, 4)`` / ``LEFT(col, 4)`` as text);
* ``CASE WHEN <condition> THEN <value> ... ELSE <value> END`` (also the simple form
  ``CASE v WHEN literal ...``) and ``IF(<condition>, <value>, <value>)``.

Conditions: comparisons (``= <> < <= > >=``) of two values of the same type, ``IN`` /
``NOT IN`` a list of literals, ``BETWEEN`` literals, ``IS [NOT] NULL``, ``LIKE`` /
``ILIKE`` a literal pattern (no ``ESCAPE``), a boolean column or literal, combined with
``AND`` / ``OR`` / ``NOT``. Each leaf is an atom of the condition-influence rule wherever
it appears.

Aggregates at a person boundary: ``COUNT(*)``, ``COUNT(DISTINCT <privacy unit or linkage
key>)``, ``COUNT(<column>)`` (read as the condition ``<column> IS NOT NULL``),
``COUNT(CASE WHEN <condition> THEN <literal> END)`` / ``COUNT_IF``-style conditional
counts, ``SUM``/``AVG`` of a bare measure column, and ``SUM``/``AVG(CASE WHEN <condition>
THEN <measure> END)``. Arithmetic on a measure is never accepted: it could extract a
value's digits, and its noise would not be calibrated to it.

Unit features (inside ``GROUP BY household_id``): ``COUNT(*)``, ``COUNT(DISTINCT person)``,
``COUNT_IF(<condition>)``, ``SUM``/``MIN``/``MAX`` of a value, ``BOOL_OR``/``BOOL_AND`` of a
condition, combined as values (arithmetic, CASE, comparisons) at the unit level.

The limits (``MAX_DEPTH``, ``MAX_ARITHMETIC``) are checked here, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from sqlglot import exp

from sekisho.guard.errors import QueryRefused, refuse

SAFE_MAGNITUDE = 2.0 ** 53        # every intermediate value stays exactly representable and far from overflow
MAX_DEPTH = 24                    # nesting of one row-level expression
MAX_ARITHMETIC = 16               # operators in one arithmetic expression (a CASE's branches count on their own)
MAX_IN_LIST = 63                  # elements of one IN list (with the IN itself: 64 conditions, neighbours.MAX_ATOMS)
COUNT_BOUND = 1.0e8               # a public bound on any count of members of a unit

NUM, STR, BOOL, NULL = "num", "str", "bool", "null"
COMPARISONS = (exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE)
ARITHMETIC = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.IntDiv, exp.Mod)
INTEGER_TYPES = {"TINYINT": 2 ** 7, "SMALLINT": 2 ** 15, "INTEGER": 2 ** 31, "INT": 2 ** 31, "BIGINT": 2 ** 63,
                 "UTINYINT": 2 ** 8, "USMALLINT": 2 ** 16, "UINTEGER": 2 ** 32, "UBIGINT": 2 ** 64,
                 "HUGEINT": 2 ** 127}


@dataclass(frozen=True)
class Value:
    """What the guard knows of a row-level value: its type and, for numbers, an interval
    that holds for every possible row."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    integral: bool = False


@dataclass(frozen=True)
class ColumnFacts:
    """What the language needs of a column: its kind, interval (numbers), whether it is a
    ``YYYY-MM`` month column, and whether it may appear at all (dimension-like)."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    month: bool = False
    integral: bool = False


def column_facts(sql_type: str | None, domain: tuple | None, month: bool = False) -> ColumnFacts:
    """Facts of a bare column from its stored type and declared domain."""
    t = (sql_type or "").upper().split("(")[0].strip()
    if t == "BOOLEAN":
        return ColumnFacts(BOOL)
    if t in INTEGER_TYPES or t in ("DOUBLE", "FLOAT", "REAL", "DECIMAL", "NUMERIC"):
        integral = t in INTEGER_TYPES
        numbers = [v for v in domain or () if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if domain and len(numbers) == len(domain):
            return ColumnFacts(NUM, float(min(numbers)), float(max(numbers)), integral=integral)
        bound = float(INTEGER_TYPES.get(t, 2.0 ** 1000))
        return ColumnFacts(NUM, -bound, bound, integral=integral)
    return ColumnFacts(STR, month=month)


# a column resolver: Column -> facts, or refuse (identifiers, measures, unknown columns)
Resolver = Callable[[exp.Column], ColumnFacts]


def _depth(node: exp.Expression) -> int:
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, d = stack.pop()
        deepest = max(deepest, d)
        for child in current.iter_expressions():
            # a chain a OR b OR c ... is one level, however sqlglot nests its pairs
            chained = isinstance(current, (exp.And, exp.Or)) and type(child) is type(current)
            stack.append((child, d if chained else d + 1))
    return deepest


def check_limits(node: exp.Expression, part: exp.Expression | None = None) -> None:
    """Depth and arithmetic size of one row-level expression, checked before anything runs."""
    if _depth(node) > MAX_DEPTH:
        raise refuse("too_complex", part if part is not None else node)
    for root in node.walk():
        if not isinstance(root, ARITHMETIC) or _arithmetic_parent(root):
            continue
        # one arithmetic expression: the operators reachable without leaving arithmetic
        # (a CASE inside it holds expressions of its own, counted on their own)
        size = sum(1 for n in root.walk(prune=lambda n: isinstance(n, (exp.Case, exp.If)))
                   if isinstance(n, ARITHMETIC))
        if size > MAX_ARITHMETIC:
            raise refuse("too_complex", root)


def _arithmetic_parent(node: exp.Expression) -> bool:
    parent = node.parent
    while isinstance(parent, exp.Paren):
        parent = parent.parent
    return isinstance(parent, (*ARITHMETIC, exp.Neg))


def _literal(node: exp.Expression) -> Value | None:
    if isinstance(node, exp.Paren):
        return _literal(node.this)
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        inner = _literal(node.this)
        return Value(NUM, -inner.hi, -inner.lo, integral=inner.integral) if inner is not None else None
    if isinstance(node, exp.Literal):
        if node.is_string:
            return Value(STR)
        try:
            v = float(node.this)
        except ValueError:
            return None
        return Value(NUM, v, v, integral=v.is_integer() and "." not in node.this and "e" not in node.this.lower())
    if isinstance(node, exp.Boolean):
        return Value(BOOL)
    if isinstance(node, exp.Null):
        return Value(NULL)
    return None


def _numeric_literal(node: exp.Expression) -> float | None:
    lit = _literal(node)
    return lit.lo if lit is not None and lit.kind == NUM else None


def _interval(lo: float, hi: float, node: exp.Expression, integral: bool = False) -> Value:
    if not (abs(lo) <= SAFE_MAGNITUDE and abs(hi) <= SAFE_MAGNITUDE):
        raise refuse("arithmetic_range", node)
    return Value(NUM, lo, hi, integral=integral)


def _arith(node: exp.Expression, a: Value, b: Value) -> Value:
    if a.kind != NUM or b.kind != NUM:
        raise refuse("expression_not_allowed", node)
    for operand in (a, b):   # e.g. the smallest BIGINT divided by -1 overflows
        _interval(operand.lo, operand.hi, node)
    both = a.integral and b.integral
    if isinstance(node, exp.Add):
        return _interval(a.lo + b.lo, a.hi + b.hi, node, both)
    if isinstance(node, exp.Sub):
        return _interval(a.lo - b.hi, a.hi - b.lo, node, both)
    if isinstance(node, exp.Mul):
        products = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
        return _interval(min(products), max(products), node, both)
    divisor = _numeric_literal(node.expression)
    if divisor is None or divisor == 0:
        # only a non-zero literal divisor is total (a column could be 0 for one row)
        raise refuse("division_not_allowed", node)
    if isinstance(node, exp.Mod):
        m = abs(divisor)
        return _interval(-m, m, node, both)
    quotients = [a.lo / divisor, a.hi / divisor]
    return _interval(min(quotients) - 1, max(quotients) + 1, node, both and isinstance(node, exp.IntDiv))


def _month_part(node: exp.Expression, resolve: Resolver) -> Value | None:
    """``SUBSTRING(month, 1, 4)`` / ``SUBSTRING(month, 6, 2)`` / ``LEFT(month, 4)``, as text,
    or cast to INTEGER; ``None`` when ``node`` is not of that form."""
    inner, cast = node, False
    if isinstance(node, (exp.Cast, exp.TryCast)):
        to = node.args.get("to")
        if to is None or not to.is_type(*exp.DataType.INTEGER_TYPES):
            return None
        inner, cast = node.this, True
    if isinstance(inner, exp.Substring):
        start, length = _numeric_literal(inner.args.get("start")), _numeric_literal(inner.args.get("length"))
        part = {(1.0, 4.0): "year", (6.0, 2.0): "month"}.get((start, length))
    elif isinstance(inner, exp.Left):
        part = "year" if _numeric_literal(inner.expression) == 4.0 else None
    else:
        return None
    column = inner.this
    if part is None or not isinstance(column, exp.Column) or not resolve(column).month:
        return None
    if not cast:
        return Value(STR)
    return Value(NUM, 0.0, 9999.0, True) if part == "year" else Value(NUM, 0.0, 99.0, True)


class RowLanguage:
    """Checks one row-level expression against the language; ``resolve`` gives the facts
    of a column (and refuses identifiers and measures where they may not appear)."""

    def __init__(self, resolve: Resolver, *, unit_resolve: Resolver | None = None):
        self.resolve = resolve
        self.unit_resolve = unit_resolve   # set inside a unit scope: unit aggregates allowed

    # ---- values
    def value(self, node: exp.Expression) -> Value:
        if isinstance(node, exp.Alias):
            return self.value(node.this)
        if isinstance(node, exp.Paren):
            return self.value(node.this)
        lit = _literal(node)
        if lit is not None:
            return lit
        if isinstance(node, exp.Column):
            facts = self.resolve(node)
            return Value(facts.kind, facts.lo, facts.hi, facts.integral)
        if isinstance(node, exp.Neg):
            v = self.value(node.this)
            if v.kind != NUM:
                raise refuse("expression_not_allowed", node)
            return _interval(-v.hi, -v.lo, node, v.integral)
        if isinstance(node, ARITHMETIC):
            return _arith(node, self.value(node.this), self.value(node.expression))
        month = _month_part(node, self.resolve)
        if month is not None:
            return month
        if isinstance(node, (exp.Cast, exp.TryCast)):
            return self._cast(node)
        if isinstance(node, exp.Case):
            return self._case(node)
        if isinstance(node, exp.If):
            self.condition(node.this)
            return self._join_values(node, [node.args.get("true"), node.args.get("false")])
        if self.unit_resolve is not None and isinstance(node, exp.AggFunc):
            return self._unit_aggregate(node)
        if isinstance(node, (exp.Predicate, exp.Not, exp.And, exp.Or)):
            self.condition(node)
            return Value(BOOL)
        raise refuse("expression_not_allowed", node)

    def _cast(self, node: exp.Expression) -> Value:
        """Casts that cannot fail: a condition or a number to an integer type wide enough
        for its interval, a number to DOUBLE, anything to text (ibis writes these)."""
        to = node.args.get("to")
        v = self.value(node.this)
        if to is None:
            raise refuse("expression_not_allowed", node)
        if to.is_type(*exp.DataType.TEXT_TYPES):
            return Value(STR)
        if to.is_type(*exp.DataType.INTEGER_TYPES):
            if v.kind == BOOL:
                return Value(NUM, 0.0, 1.0, True)
            name = to.this.value
            limit = float(INTEGER_TYPES.get(name, 0))
            low = 0.0 if name.startswith("U") else -limit
            if v.kind == NUM and v.integral and low <= v.lo and v.hi < limit:
                return v
        if to.is_type(exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT) and v.kind in (NUM, BOOL):
            return Value(NUM, v.lo if v.kind == NUM else 0.0, v.hi if v.kind == NUM else 1.0)
        if to.is_type(exp.DataType.Type.BOOLEAN) and v.kind == BOOL:
            return v
        raise refuse("expression_not_allowed", node)

    def _case(self, node: exp.Case) -> Value:
        subject = node.this
        if subject is not None:
            kind = self.value(subject).kind
            for branch in node.args.get("ifs") or []:
                lit = _literal(branch.this)
                if lit is None or lit.kind not in (kind, NULL):
                    raise refuse("expression_not_allowed", branch.this)
        else:
            for branch in node.args.get("ifs") or []:
                self.condition(branch.this)
        results = [b.args.get("true") for b in node.args.get("ifs") or []] + [node.args.get("default")]
        return self._join_values(node, results)

    def _join_values(self, node: exp.Expression, results: list) -> Value:
        values = [self.value(r) for r in results if r is not None]
        kinds = {v.kind for v in values} - {NULL}
        if len(kinds) > 1:
            raise refuse("expression_not_allowed", node)
        kind = kinds.pop() if kinds else NULL
        if kind != NUM:
            return Value(kind)
        nums = [v for v in values if v.kind == NUM]
        return Value(NUM, min(v.lo for v in nums), max(v.hi for v in nums), all(v.integral for v in nums))

    def _unit_aggregate(self, node: exp.AggFunc) -> Value:
        """A unit feature's aggregate over the unit's members (rows of a person view)."""
        members = RowLanguage(self.unit_resolve)
        arg = node.this
        if isinstance(node, exp.Count):
            if arg is None or isinstance(arg, exp.Star):
                return Value(NUM, 0.0, COUNT_BOUND, True)
            if isinstance(arg, exp.Distinct):
                values = arg.expressions
                if len(values) != 1 or not isinstance(values[0], exp.Column):
                    raise refuse("unit_scope_not_allowed", node)
                try:
                    members.value(values[0])
                except QueryRefused as refusal:   # the number of distinct persons of the unit
                    if refusal.code != "privacy_unit_in_filter":
                        raise
                return Value(NUM, 0.0, COUNT_BOUND, True)
            members.value(arg)
            return Value(NUM, 0.0, COUNT_BOUND, True)
        if isinstance(node, exp.CountIf):
            members.condition(arg)
            return Value(NUM, 0.0, COUNT_BOUND, True)
        if isinstance(node, (exp.LogicalOr, exp.LogicalAnd)):
            members.condition(arg)
            return Value(BOOL)
        if isinstance(node, (exp.Min, exp.Max)):
            if node.expressions:
                raise refuse("unit_scope_not_allowed", node)
            return members.value(arg)
        if isinstance(node, exp.Sum):
            v = members.value(arg)
            if v.kind == BOOL:
                return Value(NUM, 0.0, COUNT_BOUND, True)
            if v.kind != NUM:
                raise refuse("unit_scope_not_allowed", node)
            return _interval(min(0.0, v.lo * COUNT_BOUND), max(0.0, v.hi * COUNT_BOUND), node, v.integral)
        raise refuse("unit_scope_not_allowed", node)

    # ---- conditions
    def condition(self, node: exp.Expression) -> None:
        if isinstance(node, exp.Paren):
            return self.condition(node.this)
        if isinstance(node, (exp.And, exp.Or, exp.Xor)):
            self.condition(node.this)
            self.condition(node.expression)
            return
        if isinstance(node, exp.Not):
            return self.condition(node.this)
        if isinstance(node, exp.Boolean):
            return
        if isinstance(node, COMPARISONS):
            self._same_kind(node, self.value(node.this), self.value(node.expression))
            return
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None \
                    or node.args.get("field") is not None:
                raise refuse("subquery_in_expression", node)
            subject = self.value(node.this)
            if len(node.expressions) > MAX_IN_LIST:
                raise refuse("too_complex", node)
            for item in node.expressions:
                lit = _literal(item)
                if lit is None:
                    raise refuse("expression_not_allowed", item)
                self._same_kind(node, subject, lit)
            return
        if isinstance(node, exp.Between):
            subject = self.value(node.this)
            for bound in (node.args.get("low"), node.args.get("high")):
                lit = _literal(bound) if bound is not None else None
                if lit is None:
                    raise refuse("expression_not_allowed", bound if bound is not None else node)
                self._same_kind(node, subject, lit)
            if node.args.get("symmetric"):
                raise refuse("expression_not_allowed", node)
            return
        if isinstance(node, exp.Is):
            target = node.expression
            if not isinstance(target, (exp.Null, exp.Boolean)):
                raise refuse("expression_not_allowed", node)
            subject = self.value(node.this)
            if isinstance(target, exp.Boolean) and subject.kind not in (BOOL, NULL):
                raise refuse("type_mismatch", node)
            return
        if isinstance(node, (exp.Like, exp.ILike)):
            if node.args.get("escape") is not None:
                raise refuse("expression_not_allowed", node)
            pattern = _literal(node.expression)
            if self.value(node.this).kind != STR or pattern is None or pattern.kind != STR:
                raise refuse("expression_not_allowed", node)
            return
        if isinstance(node, exp.Escape):
            raise refuse("expression_not_allowed", node)
        v = self.value(node)
        if v.kind not in (BOOL, NULL):
            raise refuse("type_mismatch", node)

    @staticmethod
    def _same_kind(node: exp.Expression, a: Value, b: Value) -> None:
        # comparing text with a number makes the engine convert every row's text: it fails
        # for the first value that is not a number (a data-dependent error)
        if a.kind != b.kind and NULL not in (a.kind, b.kind):
            raise refuse("type_mismatch", node)


def widen_operands(nodes, facts_of: Callable[[exp.Column], ColumnFacts | None],
                   value_of: Callable[[exp.Expression], Value | None] = lambda node: None) -> None:
    """Operands of accepted arithmetic are computed as BIGINT (integers) or DOUBLE, so the
    engine computes in the range the intervals above were checked against: a narrow type
    (an INTEGER column, a cast to INTEGER, MIN/MAX or a CASE of one) could otherwise
    overflow for one row's value — an error that depends on the data. Every operand but a
    literal or another operator is widened, by its kind (``value_of``: the language's
    value of an expression, None when it has none here; columns by ``facts_of``).
    ``nodes``: the nodes of one row-level scope (structural, so a group key and the same
    expression in the projection stay equal)."""
    for node in list(nodes):
        if not _arithmetic_parent(node) or isinstance(node, (exp.Paren, exp.Literal, exp.Neg, *ARITHMETIC)) \
                or _literal(node) is not None:
            continue
        if isinstance(node, (exp.Cast, exp.TryCast)) and node.args.get("to") is not None \
                and node.args["to"].is_type("BIGINT", exp.DataType.Type.DOUBLE):
            continue   # already wide (and what an earlier pass wrote)
        if isinstance(node, exp.Column):
            facts = facts_of(node)
            if facts is None or facts.kind != NUM:
                continue
            integral = facts.integral
        elif isinstance(node, (exp.Cast, exp.TryCast)) and node.args.get("to") is not None \
                and node.args["to"].is_type(*exp.DataType.INTEGER_TYPES):
            integral = True
        elif isinstance(node, (exp.Min, exp.Max)) and isinstance(node.this, exp.Column):
            facts = facts_of(node.this)
            if facts is None or facts.kind != NUM:
                continue
            integral = facts.integral
        else:
            value = value_of(node.this if isinstance(node, (exp.Min, exp.Max)) else node)
            if value is None or value.kind != NUM:
                continue
            integral = value.integral
        wide = "BIGINT" if integral else "DOUBLE"
        node.replace(exp.Cast(this=node.copy(), to=exp.DataType.build(wide)))
