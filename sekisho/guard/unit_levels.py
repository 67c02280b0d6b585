"""The columns of a unit scope's levels and how a world's feature is written over them
(``neighbour_units``' levels 0-3; its docstring says why the statement is built in
levels), and the constant folding of conditions both modules use.
"""

from __future__ import annotations

from sqlglot import exp

from sekisho.guard.sqltext import DIALECT

# expressions a comparison lifted to level 2 may be made of (none of them can fail)
_SAFE = (exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Paren, exp.Add, exp.Sub, exp.Mul, exp.Neg,
         exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Is, exp.In, exp.Between, exp.NullSafeEQ,
         exp.Tuple)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Columns:
    """Distinct expressions (by their SQL) of one level, each a named column."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.items: dict[str, str] = {}

    def name(self, sql: str) -> str:
        if sql not in self.items:
            self.items[sql] = f"{self.prefix}{len(self.items)}"
        return self.items[sql]

    def select(self, only=None) -> list[str]:
        """``<sql> AS <name>`` of every column (of those named in ``only``)."""
        return [f"{sql} AS {_q(name)}" for sql, name in self.items.items() if only is None or name in only]


def _outermost(root: exp.Expression, wanted) -> list[exp.Expression]:
    """The nodes under ``root`` (itself included) for which ``wanted`` holds, not below another."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if wanted(node):
            found.append(node)
        else:
            stack.extend(node.iter_expressions())
    return found


def fold(node: exp.Expression) -> exp.Expression:
    """A copy of a condition with TRUE/FALSE folded into its AND/OR/NOT (exact in SQL's
    three-valued logic: FALSE AND x is FALSE, TRUE OR x is TRUE, TRUE AND x is x, ...);
    connectives below another are parenthesised."""
    def wrap(child: exp.Expression) -> exp.Expression:
        return exp.Paren(this=child) if isinstance(child, (exp.And, exp.Or, exp.Xor, exp.Not)) else child

    if isinstance(node, exp.Paren):
        return fold(node.this)
    if isinstance(node, exp.Not):
        inner = fold(node.this)
        return exp.Boolean(this=not inner.this) if isinstance(inner, exp.Boolean) else exp.Not(this=wrap(inner))
    if isinstance(node, (exp.And, exp.Or)):
        left, right = fold(node.this), fold(node.expression)
        absorbing = isinstance(node, exp.Or)   # TRUE absorbs an OR, FALSE an AND
        for a, b in ((left, right), (right, left)):
            if isinstance(a, exp.Boolean):
                return exp.Boolean(this=absorbing) if a.this == absorbing else b
        return node.__class__(this=wrap(left), expression=wrap(right))
    return node.copy()


def _safe(node: exp.Expression) -> bool:
    return all(isinstance(n, _SAFE) for n in node.walk())


class _Levels:
    """The columns of levels 1-3 and how a world's feature is written over them."""

    def __init__(self):
        self.rows = _Columns("__r")         # level 0: a world's WHERE, per row
        self.conditions = _Columns("__x")   # level 0: a COUNT_IF's condition, per row
        self.aggregates = _Columns("__a")   # level 1
        self.comparisons = _Columns("__b")  # level 2
        self.features = _Columns("__f")     # level 3
        self.reads: dict[str, frozenset[str]] = {}   # level-2/3 column -> the columns it reads
        # a unit aggregate's SQL per world, by its node: each world re-reads the aggregates
        # of the features it changes, and most of them are as in the query (reports/06's
        # 家族類型: ~25 aggregates in ~60 worlds, each render a deep copy). ``dirty``: the
        # nodes a variant being applied has changed (the path above its replacement), never
        # kept; a kept entry holds its node, so the id is not reused while kept
        self._restricted_sql: dict[tuple[int, str], tuple[exp.Expression, str]] = {}
        self.dirty: frozenset[int] = frozenset()

    def present(self, rows: str) -> str:
        """The level-2 boolean: the unit has a row that passes ``rows`` (a world's WHERE)."""
        count = self.aggregates.name(f"COUNT_IF({_q(self.rows.name(rows))})")
        name = self.comparisons.name(f"{_q(count)} > 0")
        self.reads[name] = frozenset({count})
        return name

    def feature(self, value: exp.Expression, rows: str) -> str:
        """The level-3 column of a unit feature ``value`` (a node of the row tree, left as
        it was) in the world whose WHERE is ``rows``."""
        swapped: list[tuple[exp.Expression, exp.Expression]] = []

        def swap(node: exp.Expression, name: str) -> exp.Expression:
            column = exp.column(name, quoted=True)
            if node is value:
                return column
            node.replace(column)
            swapped.append((node, column))
            return column

        try:
            top = value
            for node in _outermost(value, lambda n: isinstance(n, (exp.AggFunc, exp.Filter, exp.Column))):
                if isinstance(node, (exp.AggFunc, exp.Filter)):
                    sql = self._restricted_once(node, rows)
                else:   # a column read outside any aggregate: the linkage key
                    sql = node.sql(dialect=DIALECT)
                new = swap(node, self.aggregates.name(sql))
                if node is value:
                    top = new
            if top is value:
                for node in _outermost(value, lambda n: isinstance(n, exp.Predicate)):
                    if _safe(node):
                        name = self.comparisons.name(node.sql(dialect=DIALECT))
                        self.reads[name] = frozenset(c.name for c in node.find_all(exp.Column))
                        new = swap(node, name)
                        if node is value:
                            top = new
            name = self.features.name(top.sql(dialect=DIALECT))
            self.reads[name] = frozenset(c.name for c in top.find_all(exp.Column))
            return name
        finally:
            for node, column in reversed(swapped):
                column.replace(node)

    def _restricted_once(self, node: exp.Expression, rows: str) -> str:
        if id(node) in self.dirty:
            return self._restricted(node, rows)
        key = (id(node), rows)
        kept = self._restricted_sql.get(key)
        if kept is None or kept[0] is not node:
            kept = self._restricted_sql[key] = (node, self._restricted(node, rows))
        return kept[1]

    def _restricted(self, node: exp.Expression, rows: str) -> str:
        """An aggregate of the unit scope over the rows of one world (``rows``). Written
        without FILTER where it is the same value (FILTER costs more in DuckDB):
        ``AGG(CASE WHEN r THEN v END)`` is ``AGG(v) FILTER (WHERE r)`` for an aggregate of
        one value that skips NULLs — COUNT_IF included, which is NULL when every value is
        (not ``COUNT_IF(r AND x)``: that is 0 there) — and ``COUNT_IF(r)`` is ``COUNT(*)
        FILTER (WHERE r)`` (``r`` is never NULL)."""
        r = _q(self.rows.name(rows))
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Star):
            return f"COUNT_IF({r})"
        if isinstance(node, exp.CountIf) and set(node.args) <= {"this"}:
            return f"COUNT_IF(CASE WHEN {r} THEN {_q(self.conditions.name(node.this.sql(dialect=DIALECT)))} END)"
        if isinstance(node, (exp.Sum, exp.Min, exp.Max, exp.Avg, exp.Count)) and \
                not isinstance(node.this, (exp.Star, exp.Distinct)) and \
                all(v is None for k, v in node.args.items() if k != "this"):
            return f"{node.key.upper()}(CASE WHEN {r} THEN {node.this.sql(dialect=DIALECT)} END)"
        if isinstance(node, exp.Filter):   # the language refuses FILTER; both restrictions if present
            return (f"{node.this.sql(dialect=DIALECT)} FILTER (WHERE "
                    f"({node.expression.this.sql(dialect=DIALECT)}) AND {r})")
        return f"{node.sql(dialect=DIALECT)} FILTER (WHERE {r})"

    def level1(self, table: exp.Table, key: exp.Expression) -> str:
        key_sql = key.sql(dialect=DIALECT)
        per_row = [*self.rows.select(), *self.conditions.select()]
        level0 = f"(SELECT *, {', '.join(per_row)} FROM {table.sql(dialect=DIALECT)}) AS {_q(table.alias_or_name)}"
        return f"SELECT {', '.join(self.aggregates.select())} FROM {level0} GROUP BY {key_sql}"

    def level1_reads(self, names) -> set[str]:
        """The level-1 columns that the given level-2/3 columns read, directly or not."""
        out, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name in self.reads:
                todo.extend(self.reads[name])
            else:
                out.add(name)
        return out

    def over(self, source: str, names) -> str:
        """``source`` with the given level-2 and level-3 columns computed on its rows."""
        wanted = set(names)
        comparisons, features = self.comparisons.select(wanted), self.features.select(wanted)
        if comparisons:
            source = f"(SELECT *, {', '.join(comparisons)} FROM {source}) AS __l2"
        if features:
            source = f"(SELECT *, {', '.join(features)} FROM {source}) AS __l3"
        return source

    def closure(self, names) -> set[str]:
        """The given level-2/3 columns and the level-2 columns they read."""
        out, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name in self.reads and name not in out:
                out.add(name)
                todo.extend(self.reads[name])
        return out


def _ancestors(node: exp.Expression):
    node = node.parent
    while node is not None:
        yield node
        node = node.parent
