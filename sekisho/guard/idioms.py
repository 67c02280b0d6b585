"""Conditional aggregates written as analysts and ibis write them, in the language's forms.

``COUNT(*) FILTER (WHERE c)``, ``SUM(x) FILTER (WHERE c)``, ``AVG(x) FILTER (WHERE c)``
(what ibis emits for ``count(where=)``, ``sum(where=)``), and boolean sums
``SUM(CAST(c AS INT))`` / ``AVG(CAST(c AS INT))`` (ibis's ``(t.age >= 65).sum()`` /
``.mean()``) are rewritten into the conditional forms the row-level language accepts
(``sekisho.guard.language``): ``COUNT(CASE WHEN c THEN 1 END)``,
``SUM/AVG(CASE WHEN c THEN x END)``, and for the boolean mean the ratio of two such
counts. Each is then analysed exactly like ``WHERE c`` on its own cell: ``c`` is a
condition of the condition-influence rule and the cell has its own contributors, cell
key and suppression, so a FILTER spelling gets the same answer (and the same noise) as
its CASE spelling and as ``GROUP BY`` / ``WHERE`` on the same population.

What is not rewritten stays for the checks to refuse: ``COUNT(DISTINCT x) FILTER``
(``aggregate_filter``), FILTER on other aggregates, casts of non-conditions.
"""

from __future__ import annotations

from sqlglot import exp

from sekisho.guard.catalog import Catalog

_CONDITIONS = (exp.Predicate, exp.Not, exp.And, exp.Or, exp.Is, exp.In, exp.Between, exp.Like)


def _unparen(node: exp.Expression) -> exp.Expression:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _condition_of_cast(node: exp.Expression) -> exp.Expression | None:
    """c of ``CAST(c AS <integer>)`` when c is a condition."""
    if isinstance(node, (exp.Cast, exp.TryCast)) and node.to.is_type(*exp.DataType.INTEGER_TYPES):
        inner = _unparen(node.this)
        if isinstance(inner, _CONDITIONS):
            return inner
    return None


def _when(condition: exp.Expression, then: exp.Expression) -> exp.Case:
    return exp.Case(ifs=[exp.If(this=condition.copy(), true=then)])


def _count_when(condition: exp.Expression) -> exp.Count:
    return exp.Count(this=_when(condition, exp.Literal.number(1)))


def as_case_form(node: exp.Expression) -> exp.Expression:
    """``node`` in the language's conditional form, or ``node`` itself."""
    if isinstance(node, exp.Filter) and isinstance(node.this, exp.AggFunc):
        agg, where = node.this, node.expression
        condition = where.this if isinstance(where, exp.Where) else where
        arg = agg.this
        if isinstance(agg, exp.Count):
            if arg is None or isinstance(arg, exp.Star):
                return _count_when(condition)
            if isinstance(arg, exp.Distinct):
                return node
            known = exp.Not(this=exp.Is(this=arg.copy(), expression=exp.Null()))
            return _count_when(exp.and_(exp.paren(condition.copy(), copy=False), known))
        if isinstance(agg, (exp.Sum, exp.Avg)) and arg is not None and not isinstance(arg, exp.Distinct):
            return type(agg)(this=_when(condition, arg.copy()))
        return node
    if isinstance(node, exp.Sum):
        condition = _condition_of_cast(node.this)
        if condition is not None:
            return _count_when(condition)
    if isinstance(node, exp.Avg):
        condition = _condition_of_cast(node.this)
        if condition is not None:   # the share of rows where c holds, among rows where c is known
            known = exp.Not(this=exp.Is(this=exp.paren(condition.copy(), copy=False), expression=exp.Null()))
            return exp.Div(this=_count_when(condition), expression=_count_when(known))
    return node


def conditional_aggregates(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Pass: FILTER clauses and boolean sums in the language's conditional forms."""
    return tree.transform(as_case_form, copy=False)
