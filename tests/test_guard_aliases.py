"""Output names round-trip through the guard exactly as DuckDB names them (issue 16, item 7).

sqlglot's ``qualify`` folds every identifier to lower case (DuckDB resolves names without
regard to case, quoted or not); DuckDB itself keeps the spelling of the names a query
defines: ``AS "N"``, ``AS Total``, ``AS 人数``, a derived table's or CTE's column list,
and a column passed up from a subquery as that subquery spelled it. The oracle for every
name here is DuckDB run directly on the snapshot. Name *resolution* stays as it was:
columns case-insensitively, views by their exact name, and the classifier still sees
through renamed columns."""

from __future__ import annotations

import duckdb
import ibis
import pytest

from guard_fixtures import ibis_table
from sekisho.guard import QueryRefused
from sekisho.guard.analyze import analyze
from sekisho.guard.catalog import catalog_for_role
from sekisho.policy import load_instance_policy
from sekisho.store import Store


# ``inst`` (the shared city) and ``guard`` come from conftest.py


def duckdb_names(inst, sql: str) -> list[str]:
    """The result column names DuckDB itself gives ``sql`` on the current snapshot."""
    store = Store(inst)
    path = store.snapshots_dir / store.current_id() / "data.duckdb"
    with duckdb.connect(str(path), read_only=True) as con:
        return [d[0] for d in con.execute(f"SELECT * FROM ({sql}) AS q LIMIT 0").description]


def names_through_guard(guard, sql: str, user: str = "ana") -> list[str]:
    """Names of the answer, checked equal to the names ``describe`` gives."""
    answered = guard.query(sql, user=user).table.column_names
    described = guard.describe(sql, user=user).names
    assert described == answered
    return answered


ALIASES = [
    # quoted, as ibis writes them
    ('SELECT COUNT(*) AS "N" FROM residents', ["N"]),
    ('SELECT COUNT(*) AS "CountStar(residents)" FROM residents', ["CountStar(residents)"]),
    ('SELECT block, COUNT(*) AS "Mixed_Case" FROM residents GROUP BY block', ["block", "Mixed_Case"]),
    ('SELECT sex, COUNT(*) AS "人数(Persons)" FROM residents GROUP BY sex', ["sex", "人数(Persons)"]),
    # unquoted: DuckDB keeps the spelling of an unquoted alias too
    ("SELECT sex, COUNT(*) AS Total FROM residents GROUP BY sex", ["sex", "Total"]),
    ("SELECT sex, COUNT(*) AS 人数 FROM residents GROUP BY sex", ["sex", "人数"]),
    # GROUP BY / ORDER BY / HAVING by alias, referenced in another case
    ("SELECT sex AS Sex_Label, COUNT(*) AS Total FROM residents GROUP BY sex_label ORDER BY TOTAL DESC",
     ["Sex_Label", "Total"]),
    ("SELECT block AS Area, COUNT(*) AS Total FROM residents GROUP BY AREA HAVING total > 5 ORDER BY area",
     ["Area", "Total"]),
    # aliases of a subquery, referenced by the outer query in another case
    ("SELECT S.SEXCODE, s.total FROM (SELECT sex AS SexCode, COUNT(*) AS Total FROM residents GROUP BY sex) "
     "AS s ORDER BY s.TOTAL", ["SexCode", "Total"]),
    ("SELECT sexcode, total * 2 AS Doubled FROM (SELECT sex AS SexCode, COUNT(*) AS Total FROM residents "
     "GROUP BY sex) ORDER BY 1", ["SexCode", "Doubled"]),
    ('SELECT * FROM (SELECT sex AS "Sx", COUNT(*) AS "N" FROM residents GROUP BY sex) ORDER BY 1', ["Sx", "N"]),
    # a row-level subquery below the boundary, its alias grouped by in another case
    ("SELECT r.AGEGROUP, COUNT(*) AS N FROM (SELECT age_band AS AgeGroup FROM residents WHERE age >= 20) AS r "
     "GROUP BY r.agegroup ORDER BY 1", ["AgeGroup", "N"]),
    # unit rows (one per household): the feature's alias
    ("SELECT u.Members, COUNT(*) AS Households FROM (SELECT household_id, COUNT(*) AS Members FROM residents "
     "GROUP BY household_id) AS u GROUP BY u.MEMBERS ORDER BY 1", ["Members", "Households"]),
    # column lists of a CTE and of a derived table
    ("WITH c(Gender, Persons) AS (SELECT sex, COUNT(*) FROM residents GROUP BY sex) "
     "SELECT gender, PERSONS FROM c ORDER BY GENDER", ["Gender", "Persons"]),
    ("SELECT * FROM (SELECT sex, COUNT(*) FROM residents GROUP BY sex) AS t(Gender, Persons) ORDER BY 1",
     ["Gender", "Persons"]),
    # set operation: the names of its first branch
    ('SELECT sex AS "Key", COUNT(*) AS "N" FROM residents GROUP BY sex UNION ALL '
     'SELECT block, COUNT(*) FROM residents GROUP BY block ORDER BY "key"', ["Key", "N"]),
    # public views only
    ("SELECT facility_type AS FacilityType, COUNT(*) AS Facilities FROM facilities GROUP BY facility_type",
     ["FacilityType", "Facilities"]),
]


@pytest.mark.parametrize("sql, names", ALIASES)
def test_aliases_round_trip_as_duckdb_names_them(guard, inst, sql, names):
    assert duckdb_names(inst, sql) == names
    assert names_through_guard(guard, sql) == names


def test_aliased_values_are_the_values_of_the_aliased_columns(guard):
    """Spelling a name back does not mix up which value is which (ORDER BY an alias in
    another case sorts by that column)."""
    rows = guard.query("SELECT block AS Area, COUNT(*) AS Total FROM residents GROUP BY block "
                       "ORDER BY TOTAL DESC, area", user="ana").table.to_pylist()
    totals = [r["Total"] for r in rows if r["Total"] is not None]
    assert totals == sorted(totals, reverse=True) and len(totals) > 5
    plain = guard.query("SELECT block, COUNT(*) AS total FROM residents GROUP BY block", user="ana").table
    assert {r["Area"]: r["Total"] for r in rows} == {r["block"]: r["total"] for r in plain.to_pylist()}


# ---- resolution of names is unchanged ---------------------------------------------------
@pytest.mark.parametrize("sql, names", [
    ('SELECT SEX, "Age_Band", COUNT(*) AS n FROM residents GROUP BY SEX, "AGE_BAND"', ["sex", "age_band", "n"]),
    ("SELECT Sex, COUNT(*) AS n FROM residents AS R GROUP BY r.SEX", ["sex", "n"]),
    ("SELECT * FROM facilities ORDER BY FACILITY_ID LIMIT 1",
     ["facility_id", "facility_name", "facility_type", "block", "chome_code", "capacity_1", "capacity_2",
      "capacity_3"]),
])
def test_view_columns_resolve_without_regard_to_case_and_keep_their_declared_names(guard, inst, sql, names):
    assert duckdb_names(inst, sql) == names
    assert names_through_guard(guard, sql) == names


def test_view_names_are_still_matched_exactly(guard):
    with pytest.raises(QueryRefused) as info:
        guard.query("SELECT COUNT(*) AS n FROM RESIDENTS", user="ana")
    assert info.value.code == "unknown_view"


@pytest.mark.parametrize("sql, code", [
    # the privacy unit under a mixed-case alias is still the privacy unit
    ("SELECT s.PID, COUNT(*) AS n FROM (SELECT person_id AS Pid FROM residents) AS s GROUP BY s.pid",
     "privacy_unit_in_filter"),
    ('SELECT COUNT(*) AS n FROM (SELECT person_id AS "Who", sex FROM residents) AS s WHERE s.who = \'p0000001\'',
     "privacy_unit_in_filter"),
    ("SELECT s.Income, COUNT(*) AS n FROM (SELECT taxable_income AS Income FROM resident_tax) AS s "
     "GROUP BY s.INCOME", "measure_in_filter"),
    # two outputs of one derived table with one name (or names differing only in case):
    # DuckDB resolves s.x to the first (person_id); refused rather than guessed
    ("SELECT s.X, COUNT(*) AS n FROM (SELECT person_id AS x, sex AS X FROM residents) AS s GROUP BY s.X",
     "duplicate_output_name"),
    ("SELECT s.x, COUNT(*) AS n FROM (SELECT person_id AS x, sex AS x FROM residents) AS s GROUP BY s.x",
     "duplicate_output_name"),
    ("SELECT s.x, COUNT(*) AS n FROM (SELECT sex AS x, person_id AS x FROM residents) AS s GROUP BY s.x",
     "duplicate_output_name"),
    ("WITH s AS (SELECT taxable_income AS v, block AS V FROM resident_tax) "
     "SELECT s.v, COUNT(*) AS n FROM s GROUP BY s.v", "duplicate_output_name"),
    ("SELECT t.sex, COUNT(*) AS n FROM (SELECT sex, sex FROM residents) AS t GROUP BY t.sex",
     "duplicate_output_name"),
])
def test_checks_see_through_mixed_case_aliases(guard, sql, code):
    with pytest.raises(QueryRefused) as info:
        guard.query(sql, user="ana")
    assert info.value.code == code


def test_renamed_privacy_unit_is_still_counted_as_persons(guard, inst):
    sql = "SELECT COUNT(DISTINCT s.PID) AS Persons FROM (SELECT person_id AS Pid, sex FROM residents) AS s"
    assert names_through_guard(guard, sql) == ["Persons"] == duckdb_names(inst, sql)
    assert abs(guard.query(sql, user="ana").table.column("Persons")[0].as_py() - 3001) <= guard.ptable.max_noise


def test_fingerprint_does_not_depend_on_the_case_of_names(inst):
    """Near-identical queries share a fingerprint (and the audit's normalised SQL) as
    before: the spelling kept for the answer does not make a new one."""
    catalog = catalog_for_role(load_instance_policy(inst), "analyst")
    upper = analyze("SELECT sex AS Gender, COUNT(*) AS Total FROM residents GROUP BY GENDER", catalog)
    lower = analyze("SELECT sex AS gender, COUNT(*) AS total FROM residents GROUP BY gender", catalog)
    assert upper.fingerprint == lower.fingerprint
    assert upper.normalized_sql == lower.normalized_sql
    assert upper.expression.sql(dialect="duckdb") != lower.expression.sql(dialect="duckdb")


# ---- through ibis ---------------------------------------------------------------------
def ibis_names(guard, expr) -> list[str]:
    return names_through_guard(guard, ibis.to_sql(expr, dialect="duckdb"))


def test_ibis_aggregate_keeps_an_upper_case_name(guard):
    t = ibis_table(guard, "ana", "residents")
    expr = t.aggregate(N=t.count())
    assert ibis_names(guard, expr) == list(expr.schema().names) == ["N"]


def test_ibis_group_by_keeps_a_japanese_name(guard):
    t = ibis_table(guard, "ana", "residents")
    expr = t.group_by("sex").aggregate(人数=t.count())
    assert ibis_names(guard, expr) == list(expr.schema().names) == ["sex", "人数"]


def test_ibis_scalar_count_has_the_name_ibis_gives_it(guard):
    t = ibis_table(guard, "ana", "residents")
    expr = t.count()
    assert ibis_names(guard, expr) == list(expr.as_table().schema().names) == [expr.get_name()]
    assert expr.get_name() == "CountStar(residents)"


def test_ibis_mixed_case_names_through_subqueries(guard):
    t = ibis_table(guard, "ana", "residents")
    grown = t.filter(t.age >= 20)
    expr = (grown.group_by(AgeGroup=grown.age_band)
            .aggregate(Persons=grown.person_id.nunique(), N=grown.count())
            .order_by(ibis.desc("N")))
    expr = expr.mutate(Share=expr.N / expr.N.sum())
    assert ibis_names(guard, expr) == list(expr.schema().names) == ["AgeGroup", "Persons", "N", "Share"]


def test_ibis_backend_dataframe_has_the_schema_names(inst):
    """The symptom as an analyst saw it: ``expr.schema()`` and the DataFrame disagreed."""
    con = ibis.sekisho.connect(home=inst.home, user="ana")
    try:
        t = con.table("residents")
        expr = t.group_by("sex").aggregate(N=t.count(), 人数=t.person_id.nunique())
        assert list(expr.execute().columns) == list(expr.schema().names) == ["sex", "N", "人数"]
        d = load_instance_policy(inst).disclosure.perturbation.max_noise
        assert t.count().execute() == pytest.approx(3001, abs=d)
    finally:
        con.disconnect()
