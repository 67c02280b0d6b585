"""Static analysis of a query: a tuple of small named passes (sqlglot optimizer style).

Each pass is a function ``(expression, catalog) -> expression`` that either returns the
(possibly rewritten) expression or raises ``QueryRefused``; ``analyze`` applies them in
order and finishes with ``find_boundaries``, which classifies every scope and returns
an ``Analysis``. Nothing here looks at data, so every refusal depends only on the SQL
text and the policy.

This module is the pipeline: ``PASSES`` lists the passes in the order they run; each
lives in a module with one job:

* ``sqltext``      – parsing exactly one SELECT, writing a tree back as DuckDB reads it,
  fingerprints (the dialect, ``DIALECT``);
* ``idioms``       – conditional aggregates as analysts and ibis write them, in the
  language's forms;
* ``checks``       – the allow-lists; forbidden syntax, functions, table references;
* ``names``        – qualification against the role's schema, output names as DuckDB
  spells them, CTEs inlined;
* ``semi_joins``   – ``IN`` / ``EXISTS`` on a person or household key as SEMI/ANTI joins;
* ``classify``     – ``find_boundaries``: every scope's level (the model below), with
  ``lineage`` (what a column is at a scope), ``scope_checks`` (the row-level language
  over a scope), ``joins`` (joins on the keys) and ``boundary`` (what a boundary
  computes: ``BoundarySpec``).

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

from sekisho.guard import idioms
from sekisho.guard.catalog import Catalog
from sekisho.guard.checks import check_forbidden_syntax, check_functions, check_tables
from sekisho.guard.classify import Analysis, find_boundaries
from sekisho.guard.names import inline_ctes, qualify_columns
from sekisho.guard.semi_joins import semi_joins
from sekisho.guard.sqltext import parenthesise_integer_division, parse_single_select

PASSES = (
    idioms.conditional_aggregates,   # before the checks: they see the language's forms
    check_forbidden_syntax,
    check_functions,
    check_tables,
    qualify_columns,
    inline_ctes,
    semi_joins,
    parenthesise_integer_division,
)


def analyze(sql: str, catalog: Catalog, passes=PASSES) -> Analysis:
    """Run every pass; return the classified query or raise ``QueryRefused``."""
    tree = parse_single_select(sql)
    for check in passes:
        tree = check(tree, catalog)
    return find_boundaries(tree, catalog)
