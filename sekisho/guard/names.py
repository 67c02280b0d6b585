"""Name resolution: every column qualified against the role's visible schema, output
names spelled as DuckDB spells them, and CTE references replaced by their bodies.

After these passes every column names its source (``"t"."col"``), stars and positional
references are expanded, and each use of a CTE is a derived table in its own place, so
the classifier and the rewrite compare names exactly and see every scope where it runs.
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.errors import OptimizeError, SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused
from sekisho.guard.sqltext import DIALECT, MAX_NODES


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
