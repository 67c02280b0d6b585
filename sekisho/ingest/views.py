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

Totals (``totals:`` in the policy, e.g. a household's 所得割額 per tax year) are built
first, as working tables ``total_<name>`` (``build_total``), never written to the store;
a view column that looks one up (``derive: total``) joins it on its keys.
"""

from __future__ import annotations

from datetime import date

from sekisho.ingest.derivations import DERIVATIONS
from sekisho.ingest.errors import Problem
from sekisho.ingest.rules import (event_rkey, exact_column, ident, join_column, lit, person_rkey,
                                  seed_column)
from sekisho.policy import DayOfYear, Derivation, ExactValue, KeyValue, Policy, Total, Value, View

RKEY = "_rkey"
SQL_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "boolean": "BOOLEAN", "float": "DOUBLE"}
SOURCE_ALIAS = "s"


def table_alias(join: str | None) -> str:
    """The SQL alias of the view's source (``s``) or of join ``join`` (``j_<join>``: a
    join may be named like an SQL keyword)."""
    return SOURCE_ALIAS if join is None else f"j_{join}"


class Renderer:
    """Renders the operands of one view's definitions as SQL over its staging tables
    (``render(op)``). It knows the upload's extract month (``derive: extract_month``) and
    collects the totals the view looks up (``derive: total``): each distinct lookup is one
    ``LEFT JOIN`` of the total's table on its keys (``joins``), so the value is a column
    the derivations around it may repeat at no cost."""

    def __init__(self, extract_date: date | None = None):
        self.extract_date = extract_date
        self._totals: dict[tuple, str] = {}
        self.joins: list[str] = []

    def __call__(self, op) -> str:
        return self.render(op)

    def render(self, op) -> str:
        if isinstance(op, Value):
            return f"{table_alias(op.join)}.{ident(op.name)}"
        if isinstance(op, ExactValue):
            return f"{table_alias(op.join)}.{ident(exact_column(op.column, op.rule))}"
        if isinstance(op, KeyValue):
            return f"{table_alias(op.join)}.{key_column(op)}"
        if isinstance(op, DayOfYear):
            return f"make_date(CAST({self.render(op.year)} AS INTEGER), {op.month}, {op.day})"
        if isinstance(op, Derivation):
            return DERIVATIONS[op.name](op.params, self)
        raise TypeError(f"not an operand of a view definition: {op!r}")

    @property
    def extract_month(self) -> str:
        if self.extract_date is None:
            raise ValueError("derive: extract_month needs the upload's extract date")
        return self.extract_date.strftime("%Y-%m")

    def total_join(self, name: str, keys: tuple[tuple[str, str], ...]) -> str:
        """The alias of the joined table of total ``name`` looked up with ``keys`` (key
        name, SQL), joining it on first use."""
        found = self._totals.get((name, keys))
        if found is None:
            found = self._totals[(name, keys)] = f"t_{len(self._totals)}"
            on = " AND ".join(f"{found}.{ident('k_' + k)} = {sql}" for k, sql in keys)
            self.joins.append(f"LEFT JOIN total_{name} {found} ON {on}")
        return found


def key_column(value: KeyValue) -> str:
    """The staging column a total's key reads: a kept value, or for a keyed identifier the
    dense integer of its namespace's keymap (equal raw values, equal integers)."""
    return ident("_n_" + value.keyed_as) if value.namespace is not None else ident(value.column)


def operand_sql(op, extract_date: date | None = None) -> str:
    """An operand of a view definition as SQL over the view's staging tables (operands
    that look totals up need ``select_sql``, which adds their joins)."""
    renderer = Renderer(extract_date)
    sql = renderer.render(op)
    if renderer.joins:
        raise ValueError("a total is looked up only inside a view's SELECT (select_sql)")
    return sql


def record_key_sql(view: View) -> str:
    """``_rkey``: a byte of the person's secret seed (one record per person), or of
    sha256(seed : view name : record identity); permanent per record across uploads."""
    unit = view.columns[view.privacy_unit].origin
    seed = f"{SOURCE_ALIAS}.{seed_column(unit.name)}"
    if view.record_key.record is None:
        return person_rkey(seed)
    return event_rkey(seed, view.name, operand_sql(view.record_key.record))


def from_sql(policy: Policy, view: View | Total, extra: list[str] = ()) -> str:
    """The view's (or total's) source staging table, its joins, then ``extra`` joins."""
    source = policy.sources[view.source]
    parts = [f"stg_{view.source} {SOURCE_ALIAS}"]
    for join in view.joins.values():
        joined, alias = policy.sources[join.source], table_alias(join.alias)
        on = " AND ".join(f"{alias}.{join_column(joined.columns[theirs])} = "
                          f"{SOURCE_ALIAS}.{join_column(source.columns[mine])}"
                          for mine, theirs in join.on)
        parts.append(f"LEFT JOIN stg_{join.source} {alias} ON {on}")
    return " ".join([*parts, *extra])


def select_sql(policy: Policy, view: View, extract_date: date | None = None) -> str:
    """The SELECT producing the view's table, cast to the declared types."""
    renderer = Renderer(extract_date)
    exprs = {name: renderer.render(col.origin) for name, col in view.columns.items()}
    group = ""
    if view.one_row_per:
        group = " GROUP BY " + ", ".join(exprs[name] for name in view.one_row_per)
        exprs = {name: e if name in view.one_row_per else f"any_value({e})" for name, e in exprs.items()}
    cols = [f"CAST({exprs[name]} AS {SQL_TYPES[col.type]}) AS {ident(name)}"
            for name, col in view.columns.items()]
    if not view.public:
        cols.append(f"CAST({record_key_sql(view)} AS SMALLINT) AS {RKEY}")
    return f"SELECT {', '.join(cols)} FROM {from_sql(policy, view, renderer.joins)}{group}"


def build(con, policy: Policy, view: View, extract_date: date | None = None) -> None:
    """Create ``view_<name>`` in the working database with exactly the policy's columns."""
    con.execute(f"CREATE TABLE view_{view.name} AS {select_sql(policy, view, extract_date)}")


def total_sql(policy: Policy, total: Total) -> str:
    """The SELECT of a total: one row per combination of its keys (none of them empty),
    the sum of its measure over the records holding them (``total``)."""
    renderer = Renderer()
    keys = [f"{renderer.render(value)} AS {ident('k_' + name)}" for name, value in total.by.items()]
    present = " AND ".join(f"{ident('k_' + name)} IS NOT NULL" for name in total.by)
    return (f"SELECT * FROM (SELECT {', '.join(keys)}, sum({renderer.render(total.sum)}) AS total "
            f"FROM {from_sql(policy, total)} GROUP BY ALL) WHERE {present}")


def build_total(con, policy: Policy, total: Total) -> None:
    """Create ``total_<name>`` in the working database (never written to the store)."""
    con.execute(f"CREATE TABLE total_{total.name} AS {total_sql(policy, total)}")


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


def check_unique_per_person(con, policy: Policy, view: View) -> list[Problem]:
    """A view declaring ``unique_per_person: [C, ...]`` holds at most one row per person
    and values of C (rows with an empty C are not counted: no query fixes C to NULL).
    The guard reads one row per person where a query fixes each C (joins, DP bounds),
    so an export that breaks the declaration is refused, naming the view and columns
    (and how many persons hold duplicates; never a value)."""
    columns = tuple(view.unique_per_person)
    if not columns or view.privacy_unit is None:
        return []
    keys = ", ".join(ident(c) for c in (view.privacy_unit, *columns))
    present = " AND ".join(f"{ident(c)} IS NOT NULL" for c in columns)
    rows, persons = con.execute(
        f"SELECT coalesce(sum(n), 0), count(DISTINCT {ident(view.privacy_unit)}) FROM "
        f"(SELECT {keys}, count(*) AS n FROM view_{view.name} WHERE {present} GROUP BY {keys} "
        f"HAVING count(*) > 1)").fetchone()
    if not rows:
        return []
    source = policy.sources[view.source]
    what = ", ".join(columns)
    return [Problem(source.file, None, what,
                    f"{int(rows)} rows of {int(persons)} person(s) share a person and {what}, but "
                    f"views.{view.name}.unique_per_person declares one row per person and {what} "
                    f"/ ビュー {view.name} は個人と {what} の組ごとに1行と宣言されていますが、重複があります",
                    count=int(rows))]


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
