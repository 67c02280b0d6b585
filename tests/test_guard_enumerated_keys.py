"""Cells a neighbour cannot change, decided on the public domains alone
(``sekisho.guard.enumerated_keys``): what it excludes, that it needs the declared band
dependency to do so, that it never reads the data, and that the dependency it relies on
holds in the store."""

from __future__ import annotations

import duckdb
import pytest
import sqlglot

from guard_fixtures import truth
from sekisho.guard import enumerated_keys
from sekisho.guard.catalog import Catalog, ColumnInfo, ViewInfo
from sekisho.guard.neighbours import neighbourhood
from sekisho.policy.views import band_dependencies, band_label

AGES = tuple(range(0, 101))
BANDS = tuple(f"{lo}-{lo + 4}" for lo in range(0, 100, 5)) + ("100+",)


def _catalog(dependency: bool = True) -> Catalog:
    cols = {
        "person_id": ColumnInfo("residents", "person_id", "privacy_unit", "VARCHAR"),
        "age": ColumnInfo("residents", "age", "dimension", "BIGINT", domain=AGES),
        "age_band": ColumnInfo("residents", "age_band", "dimension", "VARCHAR", domain=BANDS,
                               band_of=("age", 5, 100) if dependency else None),
        "sex": ColumnInfo("residents", "sex", "dimension", "VARCHAR", domain=("男", "女")),
        "chome_code": ColumnInfo("residents", "chome_code", "dimension", "VARCHAR"),
    }
    return Catalog(views={"residents": ViewInfo("residents", False, cols, privacy_unit="person_id")})


def _row(keys: list[str], where: str | None = None) -> sqlglot.exp.Select:
    projections = ", ".join(f'{k} AS "__g{j}"' for j, k in enumerate(keys))
    sql = f'SELECT {projections}, "residents"."person_id" AS "__pid" FROM "residents" AS "residents"'
    return sqlglot.parse_one(sql + (f" WHERE {where}" if where else ""), read="duckdb")


class Engine:
    """The grid statements on an in-memory DuckDB, each one kept."""

    def __init__(self):
        self.con = duckdb.connect(config={"memory_limit": "256MB", "threads": 1})
        self.asked: list[str] = []

    def __call__(self, sql: str):
        self.asked.append(sql)
        table = self.con.execute(sql).to_arrow_table()
        return {name: table[name].combine_chunks() for name in table.column_names}


def _tests(keys, where=None, dependency=True):
    base, _, neighbours = neighbourhood(_row(keys, where), frozenset({"person_id"}), render=False)
    engine = Engine()
    tests = enumerated_keys.untouched(base, neighbours, range(len(neighbours)), _catalog(dependency), engine)
    return {(v.atom, v.action): tests.get(i) for i, v in enumerate(neighbours)}, engine


TOP85 = """CASE WHEN "residents"."age" >= 85 THEN '85+' ELSE "residents"."age_band" END"""


def test_the_85_plus_band_made_false_moves_only_the_old():
    tests, _ = _tests(['"residents"."chome_code"', TOP85, '"residents"."sex"'])
    false = tests[('"residents"."age" >= 85', "false")]
    true = tests[('"residents"."age" >= 85', "true")]
    assert false(("2820140001", "60-64", "女")) and false(("x", "0-4", "男"))
    assert not false(("2820140001", "85+", "女")) and not false(("2820140001", "90-94", "男"))
    assert not false(("2820140001", None, "男"))   # NULL ages: their key may move
    # made TRUE everyone goes to 85+: every band can change
    assert not true(("2820140001", "60-64", "女")) and not true(("2820140001", "85+", "女"))


def test_a_filter_on_age_cannot_change_the_other_bands():
    tests, _ = _tests(['"residents"."age_band"', '"residents"."sex"'], where='"residents"."age" >= 1')
    true = tests[('"residents"."age" >= 1', "true")]
    assert true(("5-9", "女")) and true(("100+", "男"))
    assert not true(("0-4", "女")) and not true((None, "男"))


def test_without_the_declared_band_nothing_is_excluded():
    # age_band then says nothing about age: a row aged 90 could be in any band
    tests, _ = _tests(['"residents"."chome_code"', TOP85], dependency=False)
    false = tests[('"residents"."age" >= 85', "false")]
    assert false is None or not false(("2820140001", "60-64"))


def test_a_condition_on_a_column_without_a_domain_is_not_decided():
    tests, engine = _tests(['"residents"."age_band"'], where="\"residents\".\"chome_code\" = '2820140001'")
    assert all(t is None for t in tests.values()) and not engine.asked


def test_sex_cells_are_untouched_by_a_condition_that_moves_only_men():
    key = """CASE WHEN "residents"."age" = 40 AND "residents"."sex" = '女' THEN '100+' ELSE "residents"."age_band" END"""
    tests, _ = _tests(['"residents"."chome_code"', key, '"residents"."sex"'])
    true = tests[("\"residents\".\"sex\" = '女'", "true")]
    # made TRUE it moves men of 40 to 100+: women's cells cannot change, men's can
    assert true(("c", "40-44", "女")) and not true(("c", "40-44", "男")) and not true(("c", "100+", "男"))


def test_the_grid_statements_read_no_view():
    _, engine = _tests(['"residents"."chome_code"', TOP85, '"residents"."sex"'])
    assert engine.asked
    for sql in engine.asked:
        tables = {t.name for t in sqlglot.parse_one(sql, read="duckdb").find_all(sqlglot.exp.Table)}
        assert tables <= {"__grid", "__g"}, tables


def test_band_labels_are_the_ingest_rule():
    assert [band_label(a, 5, 100) for a in (0, 4, 5, 84, 85, 99, 100, 117)] == \
        ["0-4", "0-4", "5-9", "80-84", "85-89", "95-99", "100+", "100+"]
    assert band_label(None, 5, 100) is None


@pytest.fixture(scope="module")
def policy_and_city(own_city):
    from sekisho.access import load_policy_cached
    return load_policy_cached(own_city.policy_path), own_city


def test_the_declared_band_dependencies_hold_in_the_store(policy_and_city):
    # what the guard relies on: every stored row's band is the band of its age
    policy, inst = policy_and_city
    checked = 0
    for view in policy.views.values():
        for band, (of, width, top) in band_dependencies(view, policy.sources).items():
            pairs = truth(inst, f'SELECT DISTINCT "{of}", "{band}" FROM "{view.name}"')
            assert pairs and all(b == band_label(a, width, top) for a, b in pairs), (view.name, band)
            checked += 1
    assert checked >= 2   # residents (birth_topcoded) and movements (derive: band)
