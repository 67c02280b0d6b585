"""The condition-influence rule's parts (``sekisho.guard.neighbours``,
``sekisho.guard.influence``): which conditions are atoms, which neighbouring queries they
give, and that both ways of counting the contributors a neighbour changes (one scan /
general) agree with a direct count. No ``Guard`` is constructed here."""

from __future__ import annotations

import duckdb
import pytest

from sqlglot import parse_one

from sekisho.guard.neighbour_counts import _influence_general, influence_sql, is_flat
from sekisho.guard.neighbours import Variant, apply, atoms, batch, closest, neighbourhood, ranked_conditions, \
    variant_sql

ROW = ('SELECT "r"."block" AS "__g0", "r"."person_id" AS "__pid", "r"."_rkey" AS "__rkey" '
       'FROM "residents" AS "r" WHERE {where}')


def tree(sql: str):
    return parse_one(sql, dialect="duckdb")


def atom_texts(sql: str) -> list[str]:
    return [a.sql(dialect="duckdb") for a in atoms(parse_one(sql, dialect="duckdb"), frozenset({"household_id"}))]


def test_atoms_are_the_leaf_conditions():
    sql = ROW.format(where='"r"."age" >= 65 AND NOT ("r"."sex" = \'女\' OR "r"."is_current")')
    assert atom_texts(sql) == ['"r"."age" >= 65', '"r"."sex" = \'女\'', '"r"."is_current"']


def test_case_conditions_are_atoms_and_join_keys_and_identifiers_are_not():
    sql = ('SELECT CASE WHEN "r"."age" >= 65 THEN \'a\' ELSE \'b\' END AS "__g0", "r"."person_id" AS "__pid", '
           '"r"."_rkey" AS "__rkey" FROM "residents" AS "r" JOIN "areas" AS "a" ON "r"."chome_code" = '
           '"a"."chome_code" AND "a"."block" <> \'家島\' WHERE NOT "r"."household_id" IS NULL')
    assert atom_texts(sql) == ['"a"."block" <> \'家島\'', '"r"."age" >= 65']


def test_in_elements_and_between_bounds_are_neighbours_of_their_own():
    base, _, neighbours = neighbourhood(tree(ROW.format(where='"r"."block" IN (\'家島\', \'安富\') AND "r"."age" '
                                                             'BETWEEN 20 AND 39')))
    actions = sorted(v.action for v in neighbours)
    assert actions == ["drop:0", "drop:1", "false", "high", "low", "true"]
    by = {v.action: variant_sql(base, v) for v in neighbours}
    assert "IN ('安富')" in by["drop:0"] and "IN ('家島')" in by["drop:1"]
    assert "BETWEEN" not in by["low"] and '"r"."age" <= 39' in by["low"]
    assert '"r"."age" >= 20' in by["high"]


def test_apply_combines_replacements_of_one_node():
    base, _, neighbours = neighbourhood(tree(ROW.format(where='"r"."block" IN (\'家島\', \'安富\', \'灘\')')))
    drops = [v for v in neighbours if v.action in ("drop:0", "drop:2")]
    assert "IN ('安富')" in apply(base, drops).sql(dialect="duckdb")
    everything = [v for v in neighbours if v.action.startswith("drop:")]
    assert apply(base, everything).sql(dialect="duckdb").endswith("WHERE FALSE")
    assert "'灘'" in base.sql(dialect="duckdb")   # the base tree itself is left as it was


def test_closest_takes_one_condition_and_batch_one_per_condition():
    a_true = Variant("a", 10, "true", "")
    a_false = Variant("a", 10, "false", "")
    b_false = Variant("b", 20, "false", "")
    in_0, in_1 = Variant("x = 1", 30, "drop:0", ""), Variant("x = 2", 30, "drop:1", "")
    small = [(a_true, 3), (a_false, 1), (b_false, 0), (in_0, 2), (in_1, 5)]
    assert closest(small) == [b_false]
    assert closest([(in_1, 5), (in_0, 2), (a_true, 4)]) == [in_0, in_1]   # all small elements of the IN
    assert closest([(a_true, 1), (b_false, 1)]) == [a_true]   # ties: the first in the query
    assert batch(small) == [a_false, b_false, in_0, in_1]
    # the same choices, closest condition first (the first is ``closest``)
    assert ranked_conditions(small) == [[b_false], [a_false], [in_0, in_1]]
    assert ranked_conditions([(a_true, 1), (b_false, 1)]) == [[a_true], [b_false]]


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    c.execute("CREATE TABLE residents AS SELECT 'p' || i AS person_id, i % 7 AS _rkey, "
              "['家島', '安富', '灘'][1 + i % 3] AS block, i % 90 AS age, i % 2 = 0 AS is_current "
              "FROM range(600) t(i)")
    c.execute("CREATE TABLE moves AS SELECT 'p' || (i % 200) AS person_id, i % 5 AS _rkey, "
              "['家島', '安富', '灘'][1 + i % 3] AS block, i % 90 AS age FROM range(600) t(i)")
    return c


def test_certain_conditions_go_together_but_never_a_run_that_changes_k_or_more(con):
    """``age >= 50`` twice in an OR: each made FALSE alone changes nobody (the other still
    holds), both together everyone aged 50 or more. The conditions that change nobody go
    together (closest first, the longest run that moves the query by fewer than k), so
    the duplicates are never left out in one run: the answer still selects by age."""
    from sekisho.guard.influence import decide
    from sekisho.guard.protect.cellkey import PerturbationTable
    from sekisho.guard.protect.threshold import cells_from_arrow

    statements = []

    def fetch(sql):
        statements.append(sql)
        return cells_from_arrow(con.execute(sql).to_arrow_table())

    # (ties go to the first condition in the tree's walk: the duplicates, nested deepest, last)
    where = ('("r"."age" >= 50 OR "r"."age" >= 50) AND "r"."age" < 1000 AND "r"."block" <> \'無\' '
             'AND "r"."age" <> 1000 AND "r"."block" NOT IN (\'X\', \'Y\')')
    ptable = PerturbationTable(b"t" * 32, max_noise=2, variance=1.0)
    verdict = decide(tree(ROW.format(where=where)), columns=["__g0", "__pid", "__rkey"],
                     identifiers=frozenset(), k=10, filtered=True, person_unique=True, ptable=ptable, fetch=fetch)
    answered = con.execute(f"SELECT COUNT(*) FROM ({verdict.row_sql})").fetchone()[0]
    assert answered == con.execute("SELECT COUNT(*) FROM residents WHERE age >= 50").fetchone()[0]
    assert '"r"."age" >= 50' in verdict.row_sql and "1000" not in verdict.row_sql and "'無'" not in verdict.row_sql
    assert verdict.left_out.count('"r"."age" >= 50') == 1
    # the four first in one run, then one duplicate, then the per-cell counts: 6 statements
    # (rounds and their runs), where one condition a round took 12
    assert len(statements) == 6, len(statements)


def direct_counts(con, base: str, variant: str) -> int:
    """Persons whose (cell, value) rows differ between the two row SELECTs, counted directly."""
    def rows(sql):
        out = {}
        for pid, g in con.execute(f"SELECT __pid, __g0 FROM ({sql})").fetchall():
            out.setdefault(pid, []).append(g)
        return {p: sorted(map(str, v)) for p, v in out.items()}
    a, b = rows(base), rows(variant)
    return sum(1 for p in set(a) | set(b) if a.get(p) != b.get(p))


@pytest.mark.parametrize("table, unique", [("residents", True), ("moves", False)])
@pytest.mark.parametrize("where", [
    '"r"."age" >= 80 AND "r"."block" IN (\'家島\', \'安富\')',
    'NOT ("r"."age" = 33 AND "r"."block" = \'灘\') AND "r"."age" BETWEEN 10 AND 60',
])
def test_one_scan_and_general_counts_agree_with_a_direct_count(con, table, unique, where):
    row = (f'SELECT CASE WHEN "r"."age" < 18 THEN \'child\' ELSE "r"."block" END AS "__g0", '
           f'"r"."person_id" AS "__pid", "r"."_rkey" AS "__rkey" FROM "{table}" AS "r" WHERE {where}')
    base_tree, base, neighbours = neighbourhood(tree(row))
    assert is_flat(base_tree)
    flat = con.execute(influence_sql(base_tree, neighbours, ["__g0"], person_unique=unique)).fetchone()
    # the general form (what joins and unit scopes get), on the same neighbours
    general = con.execute(_influence_general(base, [variant_sql(base_tree, v) for v in neighbours],
                                             ["__g0"])).fetchone()
    for i, v in enumerate(neighbours):
        expected = direct_counts(con, base, variant_sql(base_tree, v))
        assert flat[2 + 2 * i] == expected, v
        assert general[2 + 2 * i] == expected, v
    # and both count the query's own population alike
    assert flat[0] == general[0] == con.execute(f"SELECT COUNT(DISTINCT __pid) FROM ({base})").fetchone()[0]
    # as ``influence.decide`` asks (variants as replaced atoms): one row per person is
    # counted per pattern of atoms (an IN element or a BETWEEN bound dropped is an atom of
    # its own) and of the cells' columns, not row by row — with the same counts
    atoms_tree, _, atom_neighbours = neighbourhood(tree(row), render=False)
    by_atoms = influence_sql(atoms_tree, atom_neighbours, ["__g0"], person_unique=unique)
    assert ('COUNT(*) AS __m' in by_atoms) == unique, by_atoms
    assert con.execute(by_atoms).fetchone() == flat


def test_rows_are_counted_per_pattern_only_by_atoms_and_the_cells_columns():
    from sekisho.guard.neighbour_counts import pattern_columns

    cells = ['CASE WHEN "__atom1" THEN \'child\' ELSE "r"."block" END', '"r"."sex"']
    assert pattern_columns(['(COALESCE(("__atom0" AND "__atom1"), FALSE)) <> (COALESCE(("__atom1"), FALSE))',
                            "(CASE WHEN \"__atom0\" THEN 1 END) IS DISTINCT FROM (CASE WHEN TRUE THEN 1 END)",
                            "NOT (COALESCE((\"__atom2\"), FALSE)) AND 'x \"age\"' = 'x'"], "r", cells) == []
    assert pattern_columns(['("r"."block") IS DISTINCT FROM (CASE WHEN "__atom1" THEN \'c\' ELSE "r"."block" END)'],
                           "r", cells) == ["block"]
    for other in ['"__atom0" AND "r"."age" > 3',          # a column the cells do not read
                  '"__atom0" AND "age" > 3',              # ... unqualified
                  '"__atom0" AND age > 3',                # ... bare
                  '"__atom0" AND "x"."block" = 1',        # ... of another table
                  '(CASE WHEN "__atom0" THEN "r"."income" END) IS DISTINCT FROM NULL']:
        assert pattern_columns([other], "r", cells) is None, other


# ---- a query over one unit scope: every neighbour in one scan ---------------------------------------
ROW_UNIT = ('SELECT CASE WHEN "h"."n" >= 3 THEN \'big\' ELSE \'small\' END AS "__g0", "h"."__pid" AS "__pid", '
            '"h"."__rkey" AS "__rkey" FROM (SELECT "r"."household_id" AS "household_id", COUNT(*) AS "n", '
            'COUNT_IF("r"."relationship" IN (\'子\', \'孫\')) AS "kids", "r"."household_id" AS "__pid", '
            'TRY_CAST(SUM("r"."_rkey") % 256 AS INT) AS "__rkey" FROM "people" AS "r" '
            'WHERE {inner} AND NOT "r"."household_id" IS NULL GROUP BY "r"."household_id") AS "h" WHERE {outer}')


@pytest.fixture(scope="module")
def people():
    c = duckdb.connect()
    c.execute("CREATE TABLE people AS SELECT 'p' || i AS person_id, "
              "CASE WHEN i % 17 = 0 THEN NULL ELSE 'h' || (i // 3) END AS household_id, "
              "['世帯主', '妻', '子', '孫', '父'][1 + i % 5] AS relationship, i % 90 AS age, "
              "(i * 37) % 256 AS _rkey FROM range(900) t(i)")
    return c


@pytest.mark.parametrize("inner, outer", [
    ('"r"."age" >= 10', '"h"."kids" > 0'),
    ('"r"."age" BETWEEN 5 AND 70 AND "r"."relationship" <> \'父\'', '"h"."kids" > 0 OR "h"."n" = 1'),
])
def test_one_scan_over_a_unit_scope_counts_what_the_general_form_counts(people, inner, outer):
    base_tree, base, neighbours = neighbourhood(tree(ROW_UNIT.format(inner=inner, outer=outer)),
                                                frozenset({"household_id"}))
    assert len(neighbours) >= 8 and is_flat(base_tree)
    one_scan = influence_sql(base_tree, neighbours, ["__g0"], person_unique=False)
    assert one_scan.count("FROM \"people\"") == 1      # one scan of the view, whatever the neighbours
    assert base_tree.sql(dialect="duckdb") == base       # the base tree was left as it was
    units = people.execute(one_scan).fetchone()
    general = people.execute(_influence_general(base, [variant_sql(base_tree, v) for v in neighbours],
                                                ["__g0"])).fetchone()
    assert units == general           # contributors changed and their cell keys, neighbour by neighbour
    assert any(units[2 + 2 * i] for i in range(len(neighbours)))   # some neighbours do change units


# a household type computed in the unit scope, as reports/06 does (a CASE over comparisons of
# aggregates, with arithmetic): each CASE condition, each IN element inside COUNT_IF and each
# condition of the scope's WHERE is a neighbour; the one-scan form groups the units by their
# comparisons and counts the scope-WHERE neighbours unit by unit
ROW_UNIT_TYPE = (
    'SELECT "h"."kind" AS "__g0", "h"."big" AS "__g1", "h"."__pid" AS "__pid", "h"."__rkey" AS "__rkey" FROM '
    '(SELECT "r"."household_id" AS "household_id", '
    'CASE WHEN COUNT(*) = 1 THEN \'one\' '
    'WHEN COUNT_IF("r"."relationship" IN (\'妻\')) = 1 AND COUNT(*) = 2 + COUNT_IF("r"."relationship" IN (\'子\')) '
    'THEN \'couple\' WHEN COUNT_IF("r"."relationship" IN (\'父\', \'孫\')) > 0 THEN \'three\' ELSE \'other\' END AS "kind", '
    'MAX("r"."age") >= 60 AS "big", "r"."household_id" AS "__pid", '
    'TRY_CAST(SUM("r"."_rkey") % 256 AS INT) AS "__rkey" FROM "people" AS "r" '
    'WHERE {inner} AND NOT "r"."household_id" IS NULL GROUP BY "r"."household_id") AS "h"{outer}')


@pytest.mark.parametrize("inner, outer", [
    ('("r"."age" >= 10 AND ("r"."age" < 80 OR "r"."relationship" = \'父\'))', ''),
    ('"r"."age" BETWEEN 5 AND 70', ' WHERE "h"."kind" <> \'other\''),
])
def test_one_scan_over_unit_features_counts_what_the_general_form_counts(people, inner, outer):
    base_tree, base, neighbours = neighbourhood(tree(ROW_UNIT_TYPE.format(inner=inner, outer=outer)),
                                                frozenset({"household_id"}))
    assert len(neighbours) >= 16 and is_flat(base_tree)
    # and one neighbour given as a whole tree: counted unit by unit
    whole = Variant(atom="", index=-1, action="whole", tree=apply(base_tree, neighbours[:3]))
    compared = [*neighbours, whole]
    one_scan = influence_sql(base_tree, compared, ["__g0", "__g1"], person_unique=False)
    assert one_scan.count("FROM \"people\"") == 1
    assert base_tree.sql(dialect="duckdb") == base
    units = people.execute(one_scan).fetchone()
    general = people.execute(_influence_general(base, [variant_sql(base_tree, v) for v in compared],
                                                ["__g0", "__g1"])).fetchone()
    names = [d[0] for d in people.execute(one_scan).description]
    expected = dict(zip([d[0] for d in people.execute(_influence_general(
        base, [variant_sql(base_tree, v) for v in compared], ["__g0", "__g1"])).description], general))
    assert dict(zip(names, units)) == expected   # neighbour by neighbour, counts and cell keys
    assert sum(1 for i in range(len(compared)) if expected[f"__n{i}"]) >= 8


# generated queries over one unit scope: inner WHERE of AND/OR/IS NULL/IN/BETWEEN, features
# that are CASEs over comparisons of aggregates, booleans and bare aggregates over a column
# with NULLs (COUNT_IF of a condition that is NULL on every row of a unit is NULL), an outer
# WHERE, one or two cell columns; the one-scan form must count what the general form counts
_R = ["世帯主", "妻", "子", "孫", "父"]


def _atom(rng):
    k = rng.randrange(5)
    if k == 0:
        return f'"r"."age" >= {rng.randrange(0, 90)}'
    if k == 1:
        return f'"r"."age" < {rng.randrange(0, 90)}'
    if k == 2:
        return '"r"."relationship" IN (' + ", ".join(f"'{x}'" for x in rng.sample(_R, rng.randrange(1, 4))) + ')'
    if k == 3:
        low = rng.randrange(0, 60)
        return f'"r"."age" BETWEEN {low} AND {low + rng.randrange(5, 40)}'
    return '"r"."age" IS NULL'


def _condition(rng, depth=0):
    if depth > 1 or rng.random() < 0.4:
        return _atom(rng)
    return f"({_condition(rng, depth + 1)} {rng.choice(['AND', 'OR'])} {_condition(rng, depth + 1)})"


def _aggregate(rng):
    return rng.choice(["COUNT(*)", f"COUNT_IF({_atom(rng)})", 'MAX("r"."age")', 'SUM("r"."age")', 'COUNT("r"."age")'])


def _comparison(rng):
    return (f"{_aggregate(rng)} {rng.choice(['=', '>', '<', '>=', '<>'])} "
            f"{rng.choice(['0', '1', '2', '3 + ' + _aggregate(rng), '40'])}")


def _generated_unit_query(rng):
    case = " ".join(f"WHEN {_comparison(rng)}{' AND ' + _comparison(rng) if rng.random() < 0.4 else ''} THEN '{c}'"
                    for c in "abc"[:rng.randrange(1, 4)])
    features = {"f1": f"CASE {case} ELSE 'z' END", "f2": f"{_aggregate(rng)} >= {rng.randrange(0, 4)}",
                "f3": _aggregate(rng), "blk": 'MIN("r"."block")'}
    cells = rng.sample(["f1", "f2", "blk"], rng.randrange(1, 3))
    outer = rng.choice(["", f' WHERE "h"."f3" >= {rng.randrange(0, 3)}', ' WHERE "h"."f1" <> \'z\''])
    sql = (f'SELECT {", ".join(f"{chr(34)}h{chr(34)}.{chr(34)}{c}{chr(34)} AS {chr(34)}__g{j}{chr(34)}" for j, c in enumerate(cells))}, '
           f'"h"."__pid" AS "__pid", "h"."__rkey" AS "__rkey" FROM (SELECT "r"."household_id" AS "household_id", '
           f'{", ".join(f"{v} AS {chr(34)}{k}{chr(34)}" for k, v in features.items())}, "r"."household_id" AS "__pid", '
           f'TRY_CAST(SUM("r"."_rkey") % 256 AS INT) AS "__rkey" FROM "nullable_people" AS "r" WHERE {_condition(rng)} '
           f'AND NOT "r"."household_id" IS NULL GROUP BY "r"."household_id") AS "h"{outer}')
    return sql, [f"__g{j}" for j in range(len(cells))]


def test_one_scan_over_unit_scopes_counts_what_the_general_form_counts_on_generated_queries():
    import random

    c = duckdb.connect()
    c.execute("CREATE TABLE nullable_people AS SELECT 'p' || i AS person_id, "
              "CASE WHEN i % 17 = 0 THEN NULL ELSE 'h' || (i // 3) END AS household_id, "
              "['世帯主', '妻', '子', '孫', '父'][1 + i % 5] AS relationship, "
              "CASE WHEN i % 23 = 0 THEN NULL ELSE i % 90 END AS age, ['A', 'B', 'C'][1 + (i // 3) % 3] AS block, "
              "(i * 37) % 256 AS _rkey FROM range(1200) t(i)")
    for seed in range(80):   # seeds 61 and 70 caught COUNT_IF(r AND x) written for COUNT_IF(x) FILTER (WHERE r)
        rng = random.Random(seed)
        sql, cells = _generated_unit_query(rng)
        base_tree, base, neighbours = neighbourhood(tree(sql), frozenset({"household_id"}), 200)
        compared = list(neighbours)
        if len(neighbours) > 3 and rng.random() < 0.5:   # and a neighbour given as a whole tree
            compared.append(Variant(atom="", index=-1, action="whole", tree=apply(base_tree, neighbours[:3])))
        def counts(statement):
            cur = c.execute(statement)
            return dict(zip([d[0] for d in cur.description], cur.fetchone()))

        one = counts(influence_sql(base_tree, compared, cells, person_unique=False))
        general = counts(_influence_general(base, [variant_sql(base_tree, v) for v in compared], cells))
        assert one == general, (seed, sql)
