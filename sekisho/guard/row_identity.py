"""Row identities of the parts of a join (issue 18): when a person has one row of a view
in the query, in each cell of it, or possibly several (``joins`` reads these to refuse
fan-out). A view's identities are its declarations (``record_key: {record: C}``,
``unique_per_person: [C, ...]``); a query fixes a column by a top-level conjunct
``alias.C = <literal>`` (or ``IN (<one literal>)``), and a bare group key on a column puts
rows that differ in it into different cells. A row-level subquery passes on the
identities it leaves open under its own output names (``OpenIdentity``), so the scope
reading it may fix or group by the rest (ibis writes a filter before a join so, and a
filter after a join as a SELECT over the join's rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import REASONS, QueryRefused
from sekisho.guard.semi_joins import conjuncts


@dataclass(frozen=True)
class OpenIdentity:
    """A row identity of ``view`` whose ``columns`` (output names of the scope) are not
    fixed yet; ``nodes``: the conditions fixing its other columns."""
    view: str
    columns: tuple[str, ...]
    nodes: tuple[exp.Expression, ...] = ()


def fixed_columns(alias: str, parts: list[exp.Expression]) -> dict[str, list[exp.Expression]]:
    """Columns of ``alias`` (or unqualified) fixed to one literal by a top-level conjunct
    (``C = lit`` either way round, or ``C IN (lit)``), each with the conjuncts that fix it:
    the rows that pass hold one value of the column. Read by the joins (fan-out) and by
    the DP bounds (``dp_bounds``)."""
    fixed: dict[str, list[exp.Expression]] = {}
    for node in parts:
        for part in conjuncts(node):
            if isinstance(part, exp.EQ):
                a, b = part.this, part.expression
                if isinstance(b, exp.Column):
                    a, b = b, a
                if isinstance(a, exp.Column) and a.table in (alias, "") and isinstance(b, exp.Literal):
                    fixed.setdefault(a.name, []).append(part)
            elif isinstance(part, exp.In) and not part.args.get("query") and not part.args.get("unnest") \
                    and isinstance(part.this, exp.Column) and part.this.table in (alias, "") \
                    and len(part.expressions) == 1 and isinstance(part.expressions[0], exp.Literal):
                fixed.setdefault(part.this.name, []).append(part)
    return fixed


def identity_nodes(identity: tuple[str, ...], fixed: dict[str, list[exp.Expression]]) -> list[exp.Expression]:
    return [node for column in identity for node in fixed.get(column, ())]


def grouped_columns(select: exp.Select) -> set[tuple[str, str]]:
    """(table alias, column) of the bare columns ``select`` groups by (``GROUP BY c.x``,
    ``GROUP BY 1`` or an output alias naming such a column)."""
    group = select.args.get("group")
    if group is None:
        return set()
    outputs = list(select.expressions)
    by_alias = {e.alias: e.this for e in outputs if isinstance(e, exp.Alias)}
    out = set()
    for item in group.expressions:
        if isinstance(item, exp.Literal) and item.is_int and 1 <= int(item.this) <= len(outputs):
            item = outputs[int(item.this) - 1]
            item = item.this if isinstance(item, exp.Alias) else item
        elif isinstance(item, exp.Column) and not item.table and item.name in by_alias:
            item = by_alias[item.name]
        if isinstance(item, exp.Column) and item.table:
            out.add((item.table, item.name))
    return out


def part_rows(catalog: Catalog, alias: str, source, fixing: list[exp.Expression],
               grouped: set[tuple[str, str]] = frozenset(), inner: Any = None
               ) -> tuple[frozenset[str], frozenset[str], list[exp.Expression], list[tuple], dict[str, int | None]]:
    """For a part of a join (a table, or a row-level subquery ``inner``) at alias ``alias``:
    ({view}, {}, _, _, _) when a person may have several rows of the view in one cell of the
    query; ({}, {view}, _, _, groups) when one per cell but maybe several cells (``groups``:
    {view: in how many cells at most, or None}); ({}, {}, _, _, _) when one in all; then
    the conditions that make it so. One row per person on a person-unique
    view, or when the query fixes every column of one of the view's row identities
    (``{record: C}``, ``unique_per_person``) to a literal; one per cell when each column
    of an identity is fixed or a bare group key (rows that differ in it fall into
    different cells). Then the identities left open: (view, columns not fixed, the
    conditions fixing the others)."""
    fixed = fixed_columns(alias, fixing)
    keys = set(fixed) | {col for a, col in grouped if a == alias}
    if isinstance(source, exp.Table):
        view = catalog.views[source.name]
        if view.person_unique:
            return frozenset(), frozenset(), [], [], {}
        candidates = [(view.name, identity, ()) for identity in view.row_identities]
        several = {view.name}
    else:
        # a row-level subquery (``inner``): its views with several rows per person, each
        # with the identities it left open, named by its outputs (``SELECT * FROM v WHERE ...``)
        candidates = [(o.view, o.columns, o.nodes) for o in inner.open_identities]
        several = set(inner.multi)
    multi, per_cell, nodes, still_open, groups = set(several), set(), [], [], {}
    for name in sorted(several):
        mine = [(identity, below) for view, identity, below in candidates if view == name]
        done = next(((identity, below) for identity, below in mine if set(identity) <= set(fixed)), None)
        if done is not None:
            multi.discard(name)
        else:
            done = next(((identity, below) for identity, below in mine if set(identity) <= keys), None)
            if done is not None:
                multi.discard(name)
                per_cell.add(name)
                groups[name] = _domain_product(catalog, name, [c for c in done[0] if c not in fixed])
        if done is not None:
            nodes.extend(done[1])
            nodes.extend(identity_nodes(done[0], fixed))
            continue
        for identity, below in mine:
            rest = tuple(c for c in identity if c not in fixed)
            still_open.append((name, rest, (*below, *identity_nodes(identity, fixed))))
    return frozenset(multi), frozenset(per_cell), nodes, still_open, groups


def _domain_product(catalog: Catalog, view: str, columns: list[str]) -> int | None:
    """How many cells one person's rows of ``view`` can fall into when ``columns`` (of a
    row identity) are group keys: the product of their public domains' sizes; None when
    one has no declared domain."""
    size = 1
    for name in columns:
        column = catalog.views[view].columns.get(name)
        if column is None or not column.domain:
            return None
        size *= len(column.domain)
    return size


def outputs_of(select: exp.Select, alias: str) -> dict[str, str]:
    """{column of source ``alias``: the output name} for the bare columns ``select`` passes on."""
    out: dict[str, str] = {}
    for projection in select.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(inner, exp.Column) and inner.table == alias:
            out.setdefault(inner.name, projection.alias_or_name)
    return out


def _placeholder(column) -> str:
    """How a literal of ``column`` is written, for a refusal's hint (no value of the data)."""
    if column is not None and column.format:
        return f"'{column.format}'"
    if column is not None and column.sql_type in ("BIGINT", "INTEGER", "DOUBLE"):
        return "値"
    return "'値'"


def fan_out(catalog: Catalog, multi, part: str, node=None) -> QueryRefused:
    """``join_fan_out``, its reason naming what the analyst can fix: for each view with
    several rows per person, the columns that would leave one (a function of the policy
    and the query only)."""
    ja, en = REASONS["join_fan_out"]
    hints_ja, hints_en = [], []
    for name in sorted(multi):
        view = catalog.views.get(name)
        for identity in (view.row_identities if view is not None else ()):
            forms = [f"{c} = {_placeholder(view.columns.get(c))}" for c in identity]
            hints_ja.append(f"{name} の " + "・".join(f"{view.labels.get(c) or c}（{form}）"
                                                    for c, form in zip(identity, forms)))
            hints_en.append(f"{name}: " + " AND ".join(forms))
    reason = f"{ja} / {en}"
    if hints_ja:
        reason = (f"{ja.split('（')[0]}。{'、'.join(hints_ja)}をそれぞれ WHERE で一つの値に固定すると一人一行、"
                  f"固定するか GROUP BY の区分にすると各セルで一人一行になり、結合できます / {en.split(' (')[0]}; "
                  f"fix {'; '.join(hints_en)} in WHERE (one row per person), or fix or group by each of them "
                  "(one row per person in each cell)")
    if node is not None and not part:
        part = node.sql(dialect="duckdb")
    return QueryRefused("join_fan_out", reason=reason, part=part)
