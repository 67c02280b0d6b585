"""The row-level language (sekisho/guard/language.py, docs/guard-language.md): its document's
examples run as written; every accepted form is total over every value its columns may take
(a generated test on a table of extreme values); the largest query the limits accept for
each construct completes quickly; and what the limits refuse is refused before anything runs."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import duckdb
import pytest

from sekisho.guard import Guard, QueryRefused
from sekisho.guard.analyze import analyze
from sekisho.guard.catalog import Catalog, ColumnInfo, ViewInfo
from sekisho.guard.neighbours import MAX_ATOMS
from sekisho.guard.language import MAX_ARITHMETIC, MAX_DEPTH, MAX_IN_LIST
from sekisho.guard.rewrite import plan as make_plan
from sekisho.guard.sqltext import MAX_NODES
from sekisho.state import set_role

DOC = Path(__file__).resolve().parents[1] / "docs" / "guard-language.md"


# ---- the document's examples ---------------------------------------------------------------------------
def doc_examples() -> list[tuple[str, str | None]]:
    """(sql, None) for an accepted example, (sql, code) for a refused one."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for mark, sql in re.findall(r"<!-- (accepted|refused: [a-z_]+) -->\s*```sql\n(.*?)```", text, re.S):
        out.append((sql.strip(), None if mark == "accepted" else mark.split(": ")[1]))
    return out


@pytest.fixture(scope="module")
def city_guard(ingested_instance):
    g = Guard(ingested_instance.instance)
    set_role(ingested_instance.instance, "langdoc", "analyst")
    yield g
    g.close()


def test_the_document_has_accepted_and_refused_examples():
    examples = doc_examples()
    assert sum(code is None for _, code in examples) >= 5
    assert sum(code is not None for _, code in examples) >= 5


@pytest.mark.parametrize("sql, code", doc_examples(), ids=lambda v: (v or "accepted")[:40] if isinstance(v, str) else v)
def test_document_examples_run_as_documented(city_guard, sql, code):
    if code is None:
        result = city_guard.query(sql, user="langdoc")
        assert result.table.num_rows >= 1
    else:
        with pytest.raises(QueryRefused) as info:
            city_guard.query(sql, user="langdoc")
        assert info.value.code == code


# ---- totality: every accepted form over every value its columns may take --------------------------------
INT32, INT64 = 2 ** 31, 2 ** 63
COLUMNS = {   # name -> (stored type, declared domain, month format, extreme values incl. NULL)
    "i32": ("INTEGER", None, False, [-INT32, INT32 - 1, 0, 1, -1, None]),
    "i64": ("BIGINT", None, False, [-INT64, INT64 - 1, 0, 7, None]),
    "dom": ("BIGINT", tuple(range(0, 101)), False, [0, 100, 37, None]),
    "small": ("SMALLINT", None, False, [-2 ** 15, 2 ** 15 - 1, 0, None]),
    "dbl": ("DOUBLE", None, False, [-1.7e308, 1.7e308, float("inf"), float("-inf"), float("nan"), 0.0, None]),
    "txt": ("VARCHAR", None, False, ["", "abc", "1", "x'y", "漢字", "%", None]),
    "ym": ("VARCHAR", None, True, ["0000-01", "9999-12", "2026-10", None]),
    "flag": ("BOOLEAN", None, False, [True, False, None]),
}
KIND = {"i32": "num", "i64": "num", "dom": "num", "small": "num", "dbl": "num", "txt": "str", "ym": "str",
        "flag": "bool"}
LITERALS = {"num": ["0", "-1", "7", "2147483647", "9007199254740992", "0.5"], "str": ["''", "'abc'", "'%'"],
            "bool": ["TRUE", "NULL"]}


def catalog() -> Catalog:
    cols = {name: ColumnInfo(view="t", name=name, cls="dimension", sql_type=t, domain=dom,
                             format="YYYY-MM" if month else None)
            for name, (t, dom, month, _) in COLUMNS.items()}
    cols["pid"] = ColumnInfo(view="t", name="pid", cls="privacy_unit", sql_type="VARCHAR")
    return Catalog(views={"t": ViewInfo(name="t", public=False, columns=cols, privacy_unit="pid")})


@pytest.fixture(scope="module")
def extreme_table():
    """Every combination of one extreme value per column would be too many rows; each
    column's extremes are spread over rows with the others cycling (every value of every
    column occurs, next to every kind of neighbour value at least once)."""
    con = duckdb.connect(config={"threads": 1, "memory_limit": "256MB"})
    defs = ", ".join(f"{n} {t}" for n, (t, *_rest) in COLUMNS.items())
    con.execute(f"CREATE TABLE t ({defs}, pid VARCHAR, _rkey SMALLINT)")
    longest = max(len(v[3]) for v in COLUMNS.values())
    rows = []
    for i in range(longest * 3):
        row = [values[(i + j) % len(values)] for j, (_, _, _, values) in enumerate(COLUMNS.values())]
        rows.append(row + [f"p{i}", i % 256])
    con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * (len(COLUMNS) + 2))})", rows)
    yield con
    con.close()


def value_forms() -> list[tuple[str, str]]:
    """Row-level values built from every column with every operator and function of the
    language (those the language refuses for a column are refused, which is also fine)."""
    forms = []
    for name, kind in KIND.items():
        forms.append((name, kind))
        if kind == "num":
            for lit in LITERALS["num"]:
                for op in ("+", "-", "*", "/", "//", "%"):
                    forms.append((f"{name} {op} {lit}", "num"))
                    forms.append((f"{lit} {op} {name}", "num"))
            forms += [(f"-{name}", "num"), (f"{name} * {name}", "num"), (f"({name} + 1) * 2 // 3 - 4", "num"),
                      (f"CAST({name} AS BIGINT)", "num"), (f"CAST({name} AS INTEGER)", "num"),
                      (f"CAST({name} AS DOUBLE)", "num"), (f"CAST({name} AS VARCHAR)", "str"),
                      (f"CAST({name} AS TINYINT)", "num")]
        if kind == "str":
            forms += [(f"CAST(SUBSTRING({name}, 1, 4) AS INTEGER)", "num"),
                      (f"CAST(SUBSTRING({name}, 6, 2) AS INTEGER)", "num"), (f"SUBSTRING({name}, 1, 4)", "str"),
                      (f"LEFT({name}, 4)", "str"), (f"CAST({name} AS VARCHAR)", "str"),
                      (f"CAST({name} AS INTEGER)", "num"),
                      (f"CAST(SUBSTRING({name}, 1, 4) AS INTEGER) * 12 + CAST(SUBSTRING({name}, 6, 2) AS INTEGER)",
                       "num")]
        if kind == "bool":
            forms += [(f"CAST({name} AS INTEGER)", "num"), (f"NOT {name}", "bool")]
    forms += [("CASE WHEN dom > 50 THEN 'a' WHEN txt = 'abc' THEN 'b' ELSE NULL END", "str"),
              ("CASE dom WHEN 1 THEN 10 WHEN 2 THEN 20 ELSE -1 END", "num"),
              ("IF(flag, dom, 0) * 1000", "num"),
              ("CASE WHEN ym < '2000-01' THEN i32 ELSE small END + 1", "num")]
    return forms


def condition_forms() -> list[str]:
    out = []
    for value, kind in value_forms():
        for lit in LITERALS.get(kind, []) + [lit for k, lits in LITERALS.items() if k != kind for lit in lits[:1]]:
            for op in ("=", "<>", "<", ">="):
                out.append(f"({value}) {op} {lit}")
        if kind == "str":
            out += [f"({value}) LIKE '%a%'", f"({value}) ILIKE 'A%'", f"({value}) IN ('a', '', '1')"]
        if kind == "num":
            out += [f"({value}) BETWEEN -1 AND 1", f"({value}) IN (0, 1, -1)", f"({value}) IS NULL"]
        if kind == "bool":
            out += [f"{value}", f"({value}) IS TRUE"]
    return out


def run_if_accepted(con, sql: str, cat: Catalog) -> bool:
    """Analyse ``sql`` as the guard does; if accepted, execute the row SQL it would run
    (with the guard's own rewrites) on the extreme table. Returns whether it was accepted."""
    try:
        planned = make_plan(analyze(sql, cat), cat)
    except QueryRefused:
        return False
    for boundary in planned.boundaries:
        con.execute(f"SELECT COUNT(*) FROM ({boundary.row_sql}) AS r").fetchall()  # must not raise
    return True


def test_every_accepted_value_is_total_over_extreme_values(extreme_table):
    cat, accepted = catalog(), 0
    for value, _ in value_forms():
        accepted += run_if_accepted(extreme_table, f"SELECT {value} AS g, COUNT(*) FROM t GROUP BY 1", cat)
        accepted += run_if_accepted(extreme_table, f"SELECT COUNT(CASE WHEN ({value}) IS NOT NULL THEN 1 END) "
                                                   "FROM t", cat)
    assert accepted >= 150   # the language is not empty: most forms over most columns are accepted


def test_every_accepted_condition_is_total_over_extreme_values(extreme_table):
    cat, accepted, refused = catalog(), 0, 0
    for cond in condition_forms():
        ok = run_if_accepted(extreme_table, f"SELECT COUNT(*) FROM t WHERE {cond}", cat)
        accepted += ok
        refused += not ok
    assert accepted >= 500 and refused >= 100


def test_refusals_for_failing_forms_name_the_reason():
    cat = catalog()
    cases = {
        "SELECT COUNT(*) FROM t WHERE i64 + 1 > 0": "arithmetic_range",
        "SELECT COUNT(*) FROM t WHERE dom * 100000000000000000 > 0": "arithmetic_range",
        "SELECT COUNT(*) FROM t WHERE dom // i32 > 0": "division_not_allowed",
        "SELECT COUNT(*) FROM t WHERE dom % 0 > 0": "division_not_allowed",
        "SELECT COUNT(*) FROM t WHERE txt = 1": "type_mismatch",
        "SELECT COUNT(*) FROM t WHERE CAST(txt AS INTEGER) = 1": "expression_not_allowed",
        "SELECT COUNT(*) FROM t WHERE CAST(dbl AS BIGINT) = 1": "expression_not_allowed",
        "SELECT COUNT(*) FROM t WHERE SUBSTRING(txt, 1, 4) = 'a'": "expression_not_allowed",
    }
    for sql, code in cases.items():
        with pytest.raises(QueryRefused) as info:
            analyze(sql, cat)
        assert info.value.code == code, sql


# ---- limits: the largest accepted query of each construct completes quickly ----------------------------------
def nested_case(depth: int) -> str:
    expr = "age"
    for i in range(depth):
        expr = f"CASE WHEN age > {i} THEN {expr} ELSE {i} END"
    return expr


def largest_of_each_construct() -> dict[str, tuple[str, str]]:
    """construct -> (largest accepted SQL, just-too-large SQL)."""
    arith = lambda n: " + ".join(["age"] * (n + 1))   # noqa: E731 - n operators
    in_list = lambda n: ", ".join(str(i % 101) for i in range(n))  # noqa: E731
    depth_ok = (MAX_DEPTH - 3) // 2
    return {
        "arithmetic": (f"SELECT COUNT(*) AS n FROM residents WHERE {arith(MAX_ARITHMETIC)} >= 0",
                       f"SELECT COUNT(*) AS n FROM residents WHERE {arith(MAX_ARITHMETIC + 1)} >= 0"),
        "in_list": (f"SELECT COUNT(*) AS n FROM residents WHERE age IN ({in_list(MAX_IN_LIST)})",
                    f"SELECT COUNT(*) AS n FROM residents WHERE age IN ({in_list(MAX_IN_LIST + 1)})"),
        "nesting": (f"SELECT {nested_case(depth_ok)} AS g, COUNT(*) AS n FROM residents GROUP BY 1",
                    f"SELECT {nested_case(MAX_DEPTH)} AS g, COUNT(*) AS n FROM residents GROUP BY 1"),
        "conditions": ("SELECT COUNT(*) AS n FROM residents WHERE " +
                       " OR ".join(f"(age = {i} AND sex = '女')" for i in range(MAX_ATOMS // 2)),
                       "SELECT COUNT(*) AS n FROM residents WHERE " +
                       " OR ".join(f"(age = {i} AND sex = '女')" for i in range(MAX_ATOMS // 2 + 1))),
    }


def cte_doubling(levels: int) -> str:
    ctes = ["c0 AS (SELECT age, sex FROM residents)"]
    for i in range(1, levels + 1):
        ctes.append(f"c{i} AS (SELECT a.age, a.sex FROM c{i - 1} AS a JOIN c{i - 1} AS b ON a.age = b.age)")
    return f"WITH {', '.join(ctes)} SELECT COUNT(*) FROM c{levels}"


@pytest.mark.parametrize("construct", list(largest_of_each_construct()))
def test_largest_accepted_query_of_each_construct_completes(city_guard, construct):
    accepted, too_large = largest_of_each_construct()[construct]
    started = time.perf_counter()
    try:
        city_guard.query(accepted, user="langdoc")
    except QueryRefused as refusal:   # answered or refused for its data, but not for its size
        assert refusal.code not in ("too_complex", "execution_failed"), refusal
    # a denial-of-service bound, not a speed target (benchmarks measure speed)
    assert time.perf_counter() - started < 60
    started = time.perf_counter()
    with pytest.raises(QueryRefused) as info:
        city_guard.query(too_large, user="langdoc")
    assert info.value.code == "too_complex"
    assert time.perf_counter() - started < 5   # refused before anything runs


def test_doubling_ctes_are_refused_before_they_grow():
    cat = Catalog(views={"residents": ViewInfo(name="residents", public=False, privacy_unit="pid", columns={
        "pid": ColumnInfo("residents", "pid", "privacy_unit", "VARCHAR"),
        "age": ColumnInfo("residents", "age", "dimension", "BIGINT", domain=tuple(range(101))),
        "sex": ColumnInfo("residents", "sex", "dimension", "VARCHAR")})})
    started = time.perf_counter()
    with pytest.raises(QueryRefused) as info:
        analyze(cte_doubling(40), cat)
    assert info.value.code in ("too_complex", "personal_join")
    assert time.perf_counter() - started < 10
    assert MAX_NODES >= 1000


def test_widened_arithmetic_does_not_change_answers(city_guard, ingested_instance):
    """Operands of arithmetic are computed as BIGINT; the released group keys keep the
    integer values analysts expect."""
    rows = city_guard.query("SELECT age // 10 * 10 AS decade, COUNT(*) AS n FROM residents WHERE is_current "
                            "GROUP BY 1 ORDER BY 1", user="langdoc").table.to_pylist()
    assert [r["decade"] for r in rows][:3] == [0, 10, 20]
    assert all(isinstance(r["decade"], int) for r in rows)


def test_combinations_of_forms_stay_total(extreme_table):
    """Pairs of accepted forms combined by CASE and arithmetic are still total."""
    cat = catalog()
    nums = [v for v, kind in value_forms() if kind == "num"][:40]
    accepted = 0
    for a, b in itertools.islice(itertools.combinations(nums, 2), 300):
        accepted += run_if_accepted(extreme_table, f"SELECT CASE WHEN ({a}) > 0 THEN ({b}) ELSE ({a}) - ({b}) END AS g, "
                                                   "COUNT(*) FROM t GROUP BY 1", cat)
    assert accepted >= 50


# ---- conditional aggregates as analysts and ibis write them (issue 19 item 3) ----------------
IDIOMS = [
    ("SELECT block, COUNT(*) FILTER (WHERE age >= 65) AS n FROM residents GROUP BY block",
     "SELECT block, COUNT(CASE WHEN age >= 65 THEN 1 END) AS n FROM residents GROUP BY block"),
    ("SELECT block, SUM(CAST(age >= 65 AS INTEGER)) AS n FROM residents GROUP BY block",
     "SELECT block, COUNT(CASE WHEN age >= 65 THEN 1 END) AS n FROM residents GROUP BY block"),
    ("SELECT block, SUM(CAST((age >= 65) AS INT)) AS n FROM residents GROUP BY block",
     "SELECT block, COUNT(CASE WHEN age >= 65 THEN 1 END) AS n FROM residents GROUP BY block"),
]


@pytest.mark.parametrize("idiom, case_form", IDIOMS)
def test_conditional_aggregate_idioms_answer_as_their_case_form(guard, idiom, case_form):
    """FILTER and boolean sums are the CASE form (same cells, same noise) — and the same
    numbers as WHERE ... GROUP BY on the same population."""
    got = guard.query(idiom, user="ana").table.to_pylist()
    assert got == guard.query(case_form, user="ana").table.to_pylist()
    where = {r["block"]: r["n"] for r in guard.query(
        "SELECT block, COUNT(*) AS n FROM residents WHERE age >= 65 GROUP BY block", user="ana").table.to_pylist()}
    assert {r["block"]: r["n"] for r in got if r["n"] is not None} == {b: n for b, n in where.items()
                                                                      if n is not None}


def test_ibis_count_where_and_boolean_sum_are_accepted(guard):
    """What ibis emits for ``t.count(where=...)`` and ``(cond).sum()`` reaches the guard
    unchanged and is answered (the guard rewrites it, not the client)."""
    import ibis

    t = ibis.table({"block": "string", "age": "int16", "sex": "string"}, name="residents")
    exprs = [t.group_by("block").agg(n=t.count(where=t.age >= 65)),
             t.group_by("block").agg(n=(t.age >= 65).sum())]
    answers = [guard.query(ibis.to_sql(e, dialect="duckdb"), user="ana").table.to_pylist() for e in exprs]
    assert answers[0] and all(r["n"] is None or r["n"] >= 0 for r in answers[0])
    assert sorted(answers[0], key=str) == sorted(answers[1], key=str)


def test_filter_forms_the_language_cannot_analyse_stay_refused(guard):
    with pytest.raises(QueryRefused) as info:
        guard.query("SELECT COUNT(DISTINCT household_id) FILTER (WHERE age >= 65) AS n FROM residents", user="ana")
    assert info.value.code == "aggregate_filter"
