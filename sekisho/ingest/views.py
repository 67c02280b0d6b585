"""Building the analyst-facing tables (one store table per policy view) from the staging
tables, as each view's definition in the policy says (ARCHITECTURE.md §3).

One generic builder serves every view: the view's ``source`` staging table, ``LEFT
JOIN``ed to the staging tables of its ``joins`` along their references (every reference
was checked on upload and its target is the joined source's unique key, so a join never
adds or drops a row), each column's ``from:`` value or ``derive:`` derivation
(``sekisho.ingest.derivations``), and for person-level views the hidden record key
``_rkey``. The policy loader has resolved and type-checked every name, so a view that
loads is a view that builds. The table is written with *exactly* the columns and types
the policy declares (plus ``_rkey``): a staging column the policy does not name — in
particular any internal ``_`` column such as an exact birth date — cannot reach the store.
"""

from __future__ import annotations

from sekisho.ingest.derivations import DERIVATIONS
from sekisho.ingest.errors import Problem
from sekisho.ingest.rules import (event_rkey, exact_column, ident, join_column, lit, person_rkey,
                                  seed_column)
from sekisho.policy import DayOfYear, Derivation, ExactValue, Policy, Value, View

RKEY = "_rkey"
SQL_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "boolean": "BOOLEAN", "float": "DOUBLE"}
SOURCE_ALIAS = "s"


def table_alias(join: str | None) -> str:
    """The SQL alias of the view's source (``s``) or of join ``join`` (``j_<join>``: a
    join may be named like an SQL keyword)."""
    return SOURCE_ALIAS if join is None else f"j_{join}"


def operand_sql(op) -> str:
    """An operand of a view definition as SQL over the view's staging tables."""
    if isinstance(op, Value):
        return f"{table_alias(op.join)}.{ident(op.name)}"
    if isinstance(op, ExactValue):
        return f"{table_alias(op.join)}.{ident(exact_column(op.column, op.rule))}"
    if isinstance(op, DayOfYear):
        return f"make_date(CAST({operand_sql(op.year)} AS INTEGER), {op.month}, {op.day})"
    if isinstance(op, Derivation):
        return DERIVATIONS[op.name](op.params, operand_sql)
    raise TypeError(f"not an operand of a view definition: {op!r}")


def record_key_sql(view: View) -> str:
    """``_rkey``: a byte of the person's secret seed (one record per person), or of
    sha256(seed : view name : record identity); permanent per record across uploads."""
    unit = view.columns[view.privacy_unit].origin
    seed = f"{SOURCE_ALIAS}.{seed_column(unit.name)}"
    if view.record_key.record is None:
        return person_rkey(seed)
    return event_rkey(seed, view.name, operand_sql(view.record_key.record))


def from_sql(policy: Policy, view: View) -> str:
    """The view's source staging table and its joins."""
    source = policy.sources[view.source]
    parts = [f"stg_{view.source} {SOURCE_ALIAS}"]
    for join in view.joins.values():
        joined, alias = policy.sources[join.source], table_alias(join.alias)
        on = " AND ".join(f"{alias}.{join_column(joined.columns[theirs])} = "
                          f"{SOURCE_ALIAS}.{join_column(source.columns[mine])}"
                          for mine, theirs in join.on)
        parts.append(f"LEFT JOIN stg_{join.source} {alias} ON {on}")
    return " ".join(parts)


def select_sql(policy: Policy, view: View) -> str:
    """The SELECT producing the view's table, cast to the declared types."""
    exprs = {name: operand_sql(col.origin) for name, col in view.columns.items()}
    group = ""
    if view.one_row_per:
        group = " GROUP BY " + ", ".join(exprs[name] for name in view.one_row_per)
        exprs = {name: e if name in view.one_row_per else f"any_value({e})" for name, e in exprs.items()}
    cols = [f"CAST({exprs[name]} AS {SQL_TYPES[col.type]}) AS {ident(name)}"
            for name, col in view.columns.items()]
    if not view.public:
        cols.append(f"CAST({record_key_sql(view)} AS SMALLINT) AS {RKEY}")
    return f"SELECT {', '.join(cols)} FROM {from_sql(policy, view)}{group}"


def build(con, policy: Policy, view: View) -> None:
    """Create ``view_<name>`` in the working database with exactly the policy's columns."""
    con.execute(f"CREATE TABLE view_{view.name} AS {select_sql(policy, view)}")


def check_merged_rows(con, policy: Policy, view: View) -> list[Problem]:
    """A view with ``one_row_per`` keeps one value per group of each other column (any
    one): that is only right if the source holds one value per group, checked here."""
    if not view.one_row_per:
        return []
    keys = [operand_sql(view.columns[name].origin) for name in view.one_row_per]
    others = [col for name, col in view.columns.items() if name not in view.one_row_per]
    if not others:
        return []
    counts = ", ".join(f"count(DISTINCT {operand_sql(col.origin)}) AS {ident(col.name)}" for col in others)
    tally = ", ".join(f"count(*) FILTER (WHERE {ident(col.name)} > 1)" for col in others)
    row = con.execute(f"SELECT {tally} FROM (SELECT {counts} FROM {from_sql(policy, view)} "
                      f"GROUP BY {', '.join(keys)})").fetchone()
    source = policy.sources[view.source]
    return [Problem(source.file, None, col.name,
                    f"differs within one {', '.join(view.one_row_per)}, but views.{view.name} keeps one "
                    f"row per {', '.join(view.one_row_per)} (one_row_per)", count=int(n))
            for col, n in zip(others, row) if n]


def write(con, source: str, target: str) -> None:
    """Write the built view ``source`` (a table or view) into the snapshot table
    ``target``. The record key column is stored uncompressed: every guarded query reads
    it for the rows its filters select, and DuckDB gathers those from an uncompressed
    column faster than it unpacks the bit-packed one (0.03-0.10 ms less per query on
    the 530k city; it costs 0.7 MB)."""
    columns = con.execute(f"DESCRIBE {source}").fetchall()
    definitions = ", ".join(f"{ident(name)} {type_}" + (" USING COMPRESSION uncompressed" if name == RKEY else "")
                            for name, type_, *_ in columns)
    con.execute(f"CREATE TABLE {target} ({definitions})")
    con.execute(f"INSERT INTO {target} SELECT * FROM {source}")


def check_domains(con, policy: Policy, view: View) -> list[Problem]:
    """Every value of a column with a declared (public) domain must be in it, otherwise
    the guard's densification and DP partition selection would be wrong; every value of a
    column with a declared format must have it (the guard's row-level language computes
    on both: intervals from domains, year and month parts of ``YYYY-MM`` columns)."""
    items = [c for c in view.columns.values() if c.domain is not None or c.format]
    if not items:
        return []
    conds = []
    for c in items:
        if c.domain is None:
            conds.append(f"count(*) FILTER (WHERE {ident(c.name)} IS NOT NULL AND NOT "
                         f"regexp_full_match({ident(c.name)}, '[0-9]{{4}}-(0[1-9]|1[0-2])'))")
            continue
        values = ", ".join(lit(v) if isinstance(v, str) else
                           ("TRUE" if v is True else "FALSE" if v is False else str(v))
                           for v in c.domain)
        conds.append(f"count(*) FILTER (WHERE {ident(c.name)} IS NOT NULL "
                     f"AND {ident(c.name)} NOT IN ({values}))")
    row = con.execute(f"SELECT {', '.join(conds)} FROM view_{view.name}").fetchone()
    return [Problem(view.name, None, c.name,
                    f"{n} value(s) outside the {'domain' if c.domain is not None else 'format'} the policy "
                    f"declares for views.{view.name}.{c.name}", count=1)
            for c, n in zip(items, row) if n]
