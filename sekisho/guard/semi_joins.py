"""Pass: ``IN`` / ``EXISTS`` subqueries on a person or household key become SEMI / ANTI
joins, so the classifier checks them like any join on a key (``joins``).

``a.person_id [NOT] IN (SELECT person_id FROM v WHERE ...)`` and ``[NOT] EXISTS (SELECT
... FROM v WHERE v.person_id = a.person_id AND ...)`` are the ways analysts write "persons
who are (not) in ``v``"; written as joins, their conditions sit in the join's ON where
condition influence sees them. Any other subquery in an expression stays as written and
is refused when its scope is classified (``subquery_in_expression``).
"""

from __future__ import annotations

import itertools

from sqlglot import exp

from sekisho.guard.catalog import PRIVACY_UNIT, Catalog

SEMI, ANTI = "SEMI", "ANTI"


def conjuncts(node: exp.Expression) -> list[exp.Expression]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return conjuncts(node.this) + conjuncts(node.expression)
    return [node]


def _and(parts: list[exp.Expression]) -> exp.Expression | None:
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out = exp.And(this=out, expression=part)
    return out


def _direct_sources(select: exp.Select) -> dict[str, exp.Expression]:
    from_ = select.args.get("from_")
    items = ([from_.this] if from_ is not None else []) + [j.this for j in select.args.get("joins") or []]
    return {item.alias_or_name: item for item in items}


def _key_class(column: exp.Column, select: exp.Select, catalog: Catalog) -> str | None:
    """The policy class of ``column`` when it names a column of a view read directly."""
    source = _direct_sources(select).get(column.table)
    if isinstance(source, exp.Table) and source.name in catalog.views:
        info = catalog.views[source.name].columns.get(column.name)
        return info.cls if info is not None else None
    return None


def _simple_subquery(node: exp.Expression, catalog: Catalog) -> exp.Select | None:
    """``SELECT ... FROM <person view> [WHERE <no subquery>]``, nothing else."""
    while isinstance(node, exp.Subquery) and not node.alias:
        node = node.this
    if not isinstance(node, exp.Select):
        return None
    for arg in ("joins", "group", "having", "distinct", "order", "limit", "offset", "qualify", "windows",
                "with_", "laterals"):
        if node.args.get(arg):
            return None
    from_ = node.args.get("from_")
    table = from_.this if from_ is not None else None
    if not isinstance(table, exp.Table) or table.name not in catalog.views or catalog.views[table.name].public:
        return None
    where = node.args.get("where")
    if where is not None and any(isinstance(n, (exp.Select, exp.Subquery)) for n in where.this.walk()):
        return None
    return node


def _renamed(node: exp.Expression, old: str, new: str) -> exp.Expression:
    node = node.copy()
    for col in node.find_all(exp.Column):
        if col.table == old:
            col.set("table", exp.to_identifier(new, quoted=True))
    return node


def _semi_join(conjunct: exp.Expression, select: exp.Select, catalog: Catalog, names) -> exp.Join | None:
    negated, node = False, conjunct
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Not):
        negated, node = True, node.this
        while isinstance(node, exp.Paren):
            node = node.this
    if isinstance(node, exp.In) and node.args.get("query") is not None and isinstance(node.this, exp.Column):
        sub = _simple_subquery(node.args["query"], catalog)
        if sub is None or len(sub.expressions) != 1:
            return None
        inner = sub.expressions[0]
        inner = inner.this if isinstance(inner, exp.Alias) else inner
        table = sub.args["from_"].this
        alias = table.alias_or_name
        if not isinstance(inner, exp.Column) or inner.table != alias:
            return None
        if any(c.table != alias for c in sub.find_all(exp.Column)):
            return None   # correlated: not this form
        if negated:
            # NOT IN is NULL (no row) when the key is NULL on either side; ANTI JOIN would
            # keep such rows: only the person key, never NULL in a person-level view
            if _key_class(node.this, select, catalog) != PRIVACY_UNIT or \
                    catalog.views[table.name].columns.get(inner.name) is None or \
                    catalog.views[table.name].columns[inner.name].cls != PRIVACY_UNIT:
                return None
        fresh = _fresh(alias, select, names)
        key = exp.EQ(this=node.this.copy(), expression=exp.column(inner.name, table=fresh, quoted=True))
        where = sub.args.get("where")
        on = _and([key] + ([_renamed(where.this, alias, fresh)] if where is not None else []))
    elif isinstance(node, exp.Exists):
        sub = _simple_subquery(node.this, catalog)
        if sub is None:
            return None
        table = sub.args["from_"].this
        alias = table.alias_or_name
        where = sub.args.get("where")
        if where is None:
            return None
        keys, rest = [], []
        for part in conjuncts(where.this):
            cols = list(part.find_all(exp.Column))
            if all(c.table == alias for c in cols):
                rest.append(part)
            elif isinstance(part, exp.EQ) and isinstance(part.this, exp.Column) and \
                    isinstance(part.expression, exp.Column) and \
                    sorted([part.this.table == alias, part.expression.table == alias]) == [False, True]:
                keys.append(part)
            else:
                return None   # correlated on something else
        if len(keys) != 1:
            return None
        fresh = _fresh(alias, select, names)
        on = _and([_renamed(p, alias, fresh) for p in keys + rest])
    else:
        return None
    right = table.copy()
    right.set("alias", exp.TableAlias(this=exp.to_identifier(fresh, quoted=True)))
    return exp.Join(this=right, kind=ANTI if negated else SEMI, on=on)


def _fresh(alias: str, select: exp.Select, names) -> str:
    """The subquery's alias when no source of ``select`` has it, else a guard name."""
    taken = set(_direct_sources(select)) | set(select.meta.get("sekisho_semi_aliases", ()))
    if alias and alias not in taken and not alias.startswith("__"):
        select.meta.setdefault("sekisho_semi_aliases", []).append(alias)
        return alias
    return f"__sj{next(names)}"


def semi_joins(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """Pass: each top-level AND conjunct of a WHERE that is ``k [NOT] IN (SELECT k FROM v
    [WHERE ...])`` or ``[NOT] EXISTS (SELECT ... FROM v WHERE v.k = outer.k [AND ...])``
    becomes a SEMI (ANTI) JOIN of ``v`` on that key with the subquery's conditions in its
    ON, where the classifier checks it like any join. Other subqueries stay as written
    and are refused (``subquery_in_expression``)."""
    names = itertools.count()
    for select in list(tree.find_all(exp.Select)):
        where = select.args.get("where")
        if where is None:
            continue
        kept, added = [], []
        for conjunct in conjuncts(where.this):
            join = _semi_join(conjunct, select, catalog, names)
            (kept if join is None else added).append(conjunct if join is None else join)
        if not added:
            continue
        remaining = _and([c.copy() for c in kept])
        select.set("where", exp.Where(this=remaining) if remaining is not None else None)
        select.set("joins", list(select.args.get("joins") or []) + added)
    return tree
