"""Public domains narrowed to what the query itself selects (issue 19).

Densification puts cells onto the grid of their keys' public domains, so that an empty
cell and a small one look alike. A domain value that the query's *own* filters exclude
for every row (``age >= 97`` excludes ages 0..96) is not a cell of the answer at all:
showing it as "suppressed" said something false (fewer than k, maybe none) and flooded
the table. ``narrowed_domains`` keeps, per group key that is a bare column with a public
domain, the values that pass every conjunct of the row SELECT's WHERE clauses (at its
own level and in the derived tables the column comes through) that reads that column
alone. The row SELECT is the one the query is answered with — after condition
influence, so a condition left out narrows nothing.

Safety: the decision reads the query text and the public domain only, never the data,
and a value is dropped only when the filter is FALSE or NULL for it whatever the other
columns hold — the cell is empty by construction, for every possible dataset. Anything
the rule cannot read (conjuncts over several columns, OR across columns, JOIN ON,
expressions as keys) keeps the whole domain, as before.
"""

from __future__ import annotations

from typing import Callable

import duckdb
import pyarrow as pa
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.semi_joins import conjuncts

PLACEHOLDER = "__d"
INDEX = "__i"
DOMAIN_TABLE = "__dom"


def _same(a: exp.Column, b: exp.Column) -> bool:
    return a.name.lower() == b.name.lower() and (a.table or "").lower() == (b.table or "").lower()


def _sources(select: exp.Select) -> list[exp.Expression]:
    from_ = select.args.get("from_")
    out = [from_.this] if from_ is not None else []
    out += [j.this for j in select.args.get("joins") or []]
    return out


def column_filters(select: exp.Select, column: exp.Column, depth: int = 0) -> list[exp.Expression]:
    """Conjuncts filtering the rows of ``select`` that read only ``column`` (followed
    into the derived table it comes from), with the column replaced by ``PLACEHOLDER``."""
    if depth > 32:
        return []
    out = []
    where = select.args.get("where")
    if where is not None:
        for c in conjuncts(where.this):
            columns = list(c.find_all(exp.Column))
            if not columns or not all(_same(x, column) for x in columns):
                continue
            if any(True for _ in c.find_all(exp.Select, exp.Subquery)):
                continue
            out.append(c.copy().transform(
                lambda n: exp.column(PLACEHOLDER, quoted=True) if isinstance(n, exp.Column) else n))
    sources = _sources(select)
    if column.table:
        sources = [s for s in sources if (s.alias_or_name or "").lower() == column.table.lower()]
    elif len(sources) != 1:
        return out
    if len(sources) != 1 or not isinstance(sources[0], exp.Subquery) or not isinstance(sources[0].this, exp.Select):
        return out
    inner = sources[0].this
    for projection in inner.expressions:
        if projection.alias_or_name.lower() != column.name.lower():
            continue
        expr = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(expr, exp.Column):
            out += column_filters(inner, expr, depth + 1)
        break
    return out


def narrowed_domains(row: exp.Select, domains: list[tuple | None], key_types: list[pa.DataType],
                     connection: Callable[[], duckdb.DuckDBPyConnection]) -> list[tuple | None]:
    """``domains`` with the values the row SELECT's own filters exclude taken out."""
    out = list(domains)
    projections = {p.alias_or_name: p for p in row.expressions}
    for j, domain in enumerate(domains):
        if not domain:
            continue
        projection = projections.get(hidden.group_key(j))
        expr = projection.this if isinstance(projection, exp.Alias) else projection
        if not isinstance(expr, exp.Column):
            continue
        filters = column_filters(row, expr)
        if not filters:
            continue
        keep = _passing(domain, key_types[j], filters, connection)
        if keep is not None:
            out[j] = tuple(v for i, v in enumerate(domain) if i in keep)
    return out


def _passing(domain: tuple, arrow_type: pa.DataType, filters: list[exp.Expression],
             connection: Callable[[], duckdb.DuckDBPyConnection]) -> set[int] | None:
    """Positions of the domain values for which every filter is TRUE; None when the
    values or the filters cannot be evaluated (the whole domain is then kept)."""
    try:
        values = pa.array(list(domain), type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None
    table = pa.table({INDEX: pa.array(range(len(domain)), type=pa.int64()), PLACEHOLDER: values})
    condition = exp.and_(*[f for f in filters]).sql(dialect="duckdb")
    con = connection()
    try:
        con.register(DOMAIN_TABLE, table)
        try:
            rows = con.execute(f'SELECT "{INDEX}" FROM "{DOMAIN_TABLE}" WHERE {condition}').fetchall()
        finally:
            con.unregister(DOMAIN_TABLE)
    except duckdb.Error:
        return None
    return {int(i) for (i,) in rows}
