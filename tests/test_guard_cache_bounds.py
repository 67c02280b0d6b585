"""The guard's caches are bounded by size, not only by count (issue 17): plans,
condition-influence verdicts and DuckDB prepared statements each keep at most a number of
entries *and* an estimated number of bytes, dropping the least recently used first (a
prepared statement dropped is deallocated in DuckDB)."""

from __future__ import annotations

import duckdb
import pytest

from guard_fixtures import make_instance
from sekisho.guard import Guard, execution
from sekisho.guard.influence import Verdict, VerdictCache, verdict_bytes
from sekisho.guard.lru import SizedLRU
from sekisho.guard.planning import PlanCache, plan_bytes


def test_sized_lru_evicts_by_bytes_as_well_as_by_count():
    cache = SizedLRU(max_items=10, max_bytes=100, size_of=lambda k, v: len(v))
    assert cache.put("a", "x" * 40) == [] and cache.put("b", "y" * 40) == []
    assert cache.get("a") == "x" * 40                   # a is now the most recently used
    assert cache.put("c", "z" * 40) == [("b", "y" * 40)]   # 120 bytes > 100: b leaves
    assert cache.keys() == ["a", "c"] and cache.bytes == 80
    assert cache.put("huge", "h" * 101) == [("huge", "h" * 101)] and cache.get("huge") is None
    small = SizedLRU(max_items=2, max_bytes=10 ** 6, size_of=lambda k, v: 1)
    for key in "abc":
        small.put(key, key)
    assert small.keys() == ["b", "c"]                   # the count bound still holds
    with pytest.raises(ValueError):
        SizedLRU(max_items=0, max_bytes=1, size_of=lambda k, v: 1)


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return make_instance(tmp_path_factory.mktemp("bounds") / "inst", persons=1500, seed=31)


def test_plans_are_bounded_by_their_estimated_size(inst):
    g = Guard(inst)
    try:
        snap = g.snapshots.current()
        catalog = g._catalog("analyst", snap)
        one = plan_bytes(("ana", "analyst", snap.id, "x" * 80),
                         g.plans.plan("SELECT sex, COUNT(*) AS n FROM residents WHERE age >= 1 GROUP BY sex",
                                      user="ana", role="analyst", snapshot=snap.id, catalog=catalog))
        cache = PlanCache(size=512, max_bytes=int(one * 3.5))
        for age in range(10, 30):
            cache.plan(f"SELECT sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY sex",
                       user="ana", role="analyst", snapshot=snap.id, catalog=catalog)
        assert 1 <= len(cache) <= 4 and cache.bytes <= int(one * 3.5)
        newest = cache.keys()[-1][3]
        assert newest.endswith("age >= 29 GROUP BY sex")   # the most recent stays
    finally:
        g.close()


def test_verdicts_are_bounded_by_their_estimated_size():
    verdict = Verdict(row_sql="SELECT " + "x" * 1000, left_out=("a >= 1",))
    size = verdict_bytes(("ana", "s1", "SELECT 1"), verdict)
    cache = VerdictCache(size=2048, max_bytes=size * 5)
    for i in range(50):
        cache.verdict(("ana", "s1", "SELECT 1"[:7] + str(i)), lambda: verdict)
    assert len(cache) <= 5 and cache.bytes <= size * 5


def test_prepared_statements_are_bounded_by_size_and_deallocated(inst, monkeypatch):
    monkeypatch.setattr(execution, "PREPARED_BYTES_PER_THREAD", 3 * 64 * 400)
    g = Guard(inst)
    try:
        for age in range(20, 30):   # cells SQL of ~350 characters each: at most 3 kept
            # (asked twice: a new count takes its cells from the condition-influence scan,
            # the repeat runs the cells scan as a prepared statement)
            for _ in range(2):
                g.query(f"SELECT sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY sex", user="ana")
        snap = g.snapshots.current()
        prepared = snap._local.prepared
        assert 1 <= len(prepared) <= 3 and prepared.bytes <= 3 * 64 * 400
        kept = set(prepared.keys())
        cur = snap._local.cursor
        for (user, sql) in kept:     # what is kept can still be executed ...
            cur.execute(f"EXECUTE {prepared[(user, sql)]}")
        with pytest.raises(duckdb.Error):   # ... what was dropped was deallocated
            cur.execute("EXECUTE __sekisho_p0")
    finally:
        g.close()
