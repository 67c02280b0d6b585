"""A new query's planning (issue 17, item 4: cold queries): what is built once per catalog
instead of per query must not change any plan, and what the plan says of its group keys'
types must be what the engine says."""

from __future__ import annotations

import duckdb
import pytest

from guard_fixtures import make_instance
from sekisho.guard import QueryRefused, catalog as catalogs, planning
from sekisho.guard.catalog import Catalog, ViewInfo, arrow_type, catalog_for_role
from sekisho.guard.execution import Snapshots
from sekisho.guard.limits import Limits
from sekisho.policy import load_instance_policy
from sekisho.store import Store

QUERIES = [
    "SELECT block, COUNT(*) AS n FROM residents WHERE age >= 40 GROUP BY block",
    "SELECT Block AS \"BLOCK\", COUNT(*) AS N FROM residents AS R WHERE R.AGE < 20 GROUP BY 1 ORDER BY N DESC",
    "WITH t AS (SELECT block, sex FROM residents WHERE is_current) SELECT block, sex, COUNT(*) AS n FROM t "
    "GROUP BY block, sex",
    "SELECT s.b, s.n FROM (SELECT block AS b, COUNT(*) AS n FROM residents GROUP BY block) AS s",
    "SELECT block, COUNT(*) AS n FROM residents GROUP BY block UNION ALL "
    "SELECT block, COUNT(*) FROM movements GROUP BY block",
    "SELECT members, COUNT(*) AS households FROM (SELECT household_id, COUNT(*) AS members FROM residents "
    "WHERE is_current GROUP BY household_id) AS h GROUP BY members",
    "SELECT a.block, COUNT(*) AS n FROM residents AS r JOIN areas AS a ON r.chome_code = a.chome_code "
    "WHERE r.age BETWEEN 20 AND 29 GROUP BY a.block",
    "SELECT * FROM residents",                                  # refused: row-level output
    "SELECT nosuch, COUNT(*) FROM residents GROUP BY nosuch",   # refused: unknown column
    "SELECT block, COUNT(*) FROM nosuch GROUP BY block",        # refused: unknown view
    "SELECT _rkey, COUNT(*) FROM residents GROUP BY _rkey",     # refused: never visible
]


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return make_instance(tmp_path_factory.mktemp("cold") / "inst", persons=1500, seed=17)


@pytest.fixture(scope="module")
def snapshot(inst):
    policy = load_instance_policy(inst)
    snaps = Snapshots(Store(inst), policy, inst.secret, Limits())
    snap = snaps.current()
    yield policy, snap
    snaps.close()


def _catalog(snapshot) -> Catalog:
    policy, snap = snapshot
    return catalog_for_role(policy, "analyst", snap.types)


def _outcome(sql: str, cat: Catalog):
    try:
        plan = planning.make_plan(sql, cat)
    except QueryRefused as refusal:
        return ("refused", refusal.code, refusal.part)
    return (plan.post_sql, plan.fingerprint, plan.normalized_sql, plan.passthrough,
            [(bp.row_sql, bp.filtered, bp.unit, [k.label for k in bp.group_keys]) for bp in plan.boundaries])


def test_the_sqlglot_schema_is_built_once_per_catalog(snapshot, monkeypatch):
    cat = _catalog(snapshot)
    first = cat.sqlglot_schema("duckdb")
    assert cat.sqlglot_schema("duckdb") is first
    # a changed catalog gets a schema of its own: a column taken away cannot be qualified
    view = cat.views["residents"]
    cat.views["residents"] = ViewInfo(name=view.name, public=view.public, privacy_unit=view.privacy_unit,
                                      columns={c: i for c, i in view.columns.items() if c != "age"})
    assert cat.sqlglot_schema("duckdb") is not first
    with pytest.raises(QueryRefused) as info:
        planning.make_plan("SELECT age, COUNT(*) AS n FROM residents GROUP BY age", cat)
    assert info.value.code == "unknown_column"
    cat.views["residents"] = view
    # rebuilt after SCHEMA_USES queries, so that sqlglot's lookup caches in it stay bounded
    monkeypatch.setattr(catalogs, "SCHEMA_USES", 3)
    built = cat.sqlglot_schema("duckdb")
    assert [cat.sqlglot_schema("duckdb") is built for _ in range(3)] == [True, True, False]


def test_plans_do_not_depend_on_the_cached_schema(snapshot):
    """The same plans and refusals whether the catalog's schema was just built or has
    served other queries before (in any order)."""
    fresh = [_outcome(sql, _catalog(snapshot)) for sql in QUERIES]
    shared = _catalog(snapshot)
    assert [_outcome(sql, shared) for sql in QUERIES] == fresh
    assert [_outcome(sql, shared) for sql in reversed(QUERIES)] == list(reversed(fresh))
    assert sum(1 for o in fresh if o[0] == "refused") == 4


def test_group_key_types_are_known_from_the_catalog(snapshot):
    """A group key that is a bare view column (also through a derived table or CTE)
    names that column; its Arrow type from the catalog is the one DuckDB returns for the
    boundary's row SELECT. Computed keys name no column."""
    policy, snap = snapshot
    cat = _catalog(snapshot)
    checked = 0
    for view in cat.views.values():
        if view.public:
            continue
        for column in view.columns.values():
            if column.cls != "dimension":
                continue
            for sql in (f'SELECT "{column.name}", COUNT(*) AS n FROM "{view.name}" GROUP BY 1',
                        f'WITH t AS (SELECT "{column.name}" AS k FROM "{view.name}") '
                        f'SELECT k, COUNT(*) AS n FROM t GROUP BY k'):
                bp = planning.make_plan(sql, cat).boundaries[0]
                key = bp.group_keys[0]
                assert key.column is not None and key.column.name == column.name
                engine = snap.cursor().execute(f"SELECT * FROM ({bp.row_sql}) LIMIT 0").to_arrow_table()
                expected = engine.schema.field("__g0").type
                known = arrow_type(key.column.sql_type)
                assert known is None or known == expected, (sql, known, expected)
                checked += known is not None
    assert checked >= 10
    computed = planning.make_plan("SELECT age // 10 AS d, COUNT(*) AS n FROM residents GROUP BY 1", cat)
    assert computed.boundaries[0].group_keys[0].column is None


@pytest.mark.parametrize("sql_type", sorted(catalogs.ARROW_TYPES))
def test_arrow_types_are_duckdbs(sql_type):
    con = duckdb.connect()
    try:
        engine = con.execute(f"SELECT CAST(NULL AS {sql_type}) AS x LIMIT 0").to_arrow_table().schema.field("x").type
    finally:
        con.close()
    assert arrow_type(sql_type) == arrow_type(sql_type.lower()) == engine


def test_the_row_select_owns_its_nodes(snapshot):
    """FROM, JOIN and WHERE move from the boundary into the row SELECT (no copy): every
    node of a boundary's row tree has that tree as its root, and the trees of two
    boundaries share nothing."""
    cat = _catalog(snapshot)
    for sql in QUERIES:
        try:
            plan = planning.make_plan(sql, cat)
        except QueryRefused:
            continue
        seen: set[int] = set()
        for bp in plan.boundaries:
            nodes = list(bp.row.walk())
            assert all(node.root() is bp.row for node in nodes), sql
            ids = {id(node) for node in nodes}
            assert not ids & seen, sql
            seen |= ids


# ---- scans a new query no longer runs (issue 17, item 4) ----------------------------------
THRESHOLD_QUERIES = [
    # several rows per person: the population check reads condition influence's last count
    "SELECT idou_type, sex, COUNT(*) AS n FROM movements WHERE idou_year = 2023 AND age > 30 GROUP BY idou_type, sex",
    "SELECT block, COUNT(*) AS n FROM movements WHERE age BETWEEN 20 AND 60 GROUP BY block",
    "SELECT idou_type, COUNT(*) AS n FROM movements WHERE block = '家島' AND age > 90 GROUP BY idou_type",
    # one row per (person, tax_year) by declaration, the year fixed: cells without per-person grouping
    "SELECT block, SUM(taxable_income) AS income, AVG(income_levy) AS levy, COUNT(*) AS n FROM resident_tax "
    "WHERE tax_year = 2025 AND age_band <> '20-24' GROUP BY block",
    "SELECT sex, COUNT(DISTINCT person_id) AS n, SUM(income_levy) AS levy FROM resident_tax "
    "WHERE tax_year = 2024 GROUP BY sex",
    "SELECT block, SUM(CASE WHEN age_band = '50-54' THEN taxable_income END) AS s, COUNT(*) AS n "
    "FROM resident_tax WHERE tax_year = 2025 GROUP BY block",
    # the year not fixed, or left out: still grouped by person
    "SELECT block, SUM(taxable_income) AS income FROM resident_tax WHERE age_band = '30-34' GROUP BY block",
    "SELECT block, COUNT(*) AS n FROM resident_tax WHERE tax_year = 2025 OR block = '家島' GROUP BY block",
    # joins, unit scopes, a filter near k
    "SELECT a.block, COUNT(*) AS n FROM residents AS r JOIN areas AS a ON r.chome_code = a.chome_code "
    "WHERE r.age BETWEEN 20 AND 29 GROUP BY a.block",
    "SELECT members, COUNT(*) AS households FROM (SELECT household_id, COUNT(*) AS members FROM residents "
    "WHERE is_current AND age >= 10 GROUP BY household_id) AS h GROUP BY members",
    "SELECT sex, COUNT(*) AS n FROM movements WHERE block = '家島' AND age >= 99 GROUP BY sex",
    # one row per person, contributor counts only: the cells from the rule's first scan (not
    # the third: its CASE condition moves persons between cells, so the scans stay apart)
    "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= 18 GROUP BY block, sex",
    "SELECT age_band, COUNT(*) AS n, COUNT(DISTINCT person_id) AS persons FROM residents "
    "WHERE sex = '女' AND block IN ('家島', '灘', '網干') GROUP BY age_band",
    "SELECT CASE WHEN age < 15 THEN 'child' ELSE block END AS g, COUNT(*) AS n FROM residents "
    "WHERE age BETWEEN 5 AND 70 GROUP BY 1",
]


def _answers(inst, monkeypatch, *, shortcuts: bool):
    """Each query's answer (table, cells, summary without its id, or the refusal) and the
    populations the check counted, with or without the scans saved."""
    from sekisho.guard import Guard
    from sekisho.guard.protection import ThresholdProtection

    populations, used = [], {"declared": 0, "counted": 0, "own": 0}
    with monkeypatch.context() as m:
        influence, declared = ThresholdProtection._apply_influence, ThresholdProtection._declared_one_row
        if shortcuts:
            def spy_declared(ctx, bp):
                one_row = declared(ctx, bp)
                used["declared"] += one_row
                return one_row

            def spy_influence(*args):
                run, left_out, counted, low, own = influence(*args)
                used["counted"] += counted is not None and args[1].filtered and not args[2]
                used["own"] += own is not None
                return run, left_out, counted, low, own
            m.setattr(ThresholdProtection, "_declared_one_row", staticmethod(spy_declared))
            m.setattr(ThresholdProtection, "_apply_influence", staticmethod(spy_influence))
        else:
            m.setattr(ThresholdProtection, "_declared_one_row", staticmethod(lambda ctx, bp: False))
            # no population from the rule's scan, no cells from it: every scan of its own
            m.setattr(ThresholdProtection, "_apply_influence",
                      staticmethod(lambda *a: influence(*a)[:2] + (None,) + influence(*a)[3:4] + (None,)))
        check = ThresholdProtection._check_population

        def counted(*args, **kwargs):
            populations.append(check(*args, **kwargs))
            return populations[-1]
        m.setattr(ThresholdProtection, "_check_population", staticmethod(counted))
        guard = Guard(inst)
        out = []
        try:
            for sql in THRESHOLD_QUERIES:
                try:
                    result = guard.query(sql, user="ana", mode="threshold")
                except QueryRefused as refusal:
                    out.append(("refused", refusal.code))
                    continue
                summary = {k: v for k, v in result.summary.items() if k != "query_id"}
                rows = result.table.to_pylist()
                cells = result.cells.to_pylist() if result.cells is not None else [None] * len(rows)
                # a query without ORDER BY (a join) may return its rows in any order
                pairs = sorted(zip(rows, cells), key=repr)
                out.append(([r for r, _ in pairs], [c for _, c in pairs], summary))
        finally:
            guard.close()
    return out, populations, used


def test_saved_scans_release_the_same(inst, monkeypatch):
    """The population from condition influence's last scan, the cells of a boundary
    whose declared row identity the query fixes (counted without grouping by person) and
    a new count's cells from the rule's first scan give the same answers, cells, notes,
    refusals and populations as the separate scans."""
    fast, fast_populations, used = _answers(inst, monkeypatch, shortcuts=True)
    slow, slow_populations, _ = _answers(inst, monkeypatch, shortcuts=False)
    assert fast == slow
    assert fast_populations == slow_populations
    assert used["declared"] >= 3 and used["counted"] >= 3 and used["own"] >= 2, used
    assert sum(1 for o in fast if o[0] == "refused") >= 1 and sum(1 for o in fast if o[0] != "refused") >= 8
