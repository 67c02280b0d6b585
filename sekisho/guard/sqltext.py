"""The SQL text side of the analysis: the one dialect, parsing exactly one SELECT,
writing a tree back as DuckDB reads it, and fingerprints.

Every stage after parsing works on trees; text comes in once (``parse_single_select``,
bounded in characters and nodes) and goes out once per statement that runs, in
``DIALECT``.
"""

from __future__ import annotations

import hashlib

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused, refuse

DIALECT = "duckdb"
MAX_SQL_CHARS = 100_000
MAX_NODES = 20_000


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


def parenthesise_integer_division(tree: exp.Expression, catalog: Catalog) -> exp.Expression:
    """``a // b`` in parentheses: DuckDB binds ``//`` more loosely than a comparison, so
    ``x // 12 < 15`` written back without them would run as ``x // (12 < 15)``."""
    for node in list(tree.find_all(exp.IntDiv)):
        if not isinstance(node.parent, exp.Paren):
            node.replace(exp.Paren(this=node.copy()))
    return tree


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
    text = masked.sql(dialect=DIALECT, normalize=True, copy=False)   # ``masked`` is this function's own copy
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]
