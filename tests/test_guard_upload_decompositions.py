"""Averaging decompositions across an upload (issue 15, class 6 (c)).

Within one snapshot, consistent noise gives a repeated or rephrased cell the same draw;
only a new *partition* of a region into released parts is a fresh draw of the region's
count, and averaging many partitions gives its exact count. An exact count of k or more
persons is no disclosure by itself, but the exact counts of one region on the snapshots
before and after an upload are: the region's change is the newcomer. The attacker here
knows each newcomer's block (one newcomer per block per upload) and asks, on every
snapshot, unfiltered tabulations of block x sex split by many different cut points
(``age >= t``): each splits every (block, sex) region into two released parts. The
newcomer's sex is guessed from the region whose averaged count grew most. Three more
spellings of the split: the cut in WHERE (two queries, ``age >= t`` and ``age < t``),
conditional counts (``COUNT(*) FILTER (WHERE age >= t)``) and the region fixed in WHERE
(``WHERE block = B GROUP BY sex, age >= t``).

Every spelling runs against the raw store (``RawOracle``), where it must succeed, and
against the guard: without holds (the attack must beat the base rate there too, so the
hold is what stops it, and the alert is audited) and with the policy's holds (the
analyst is paused and the attack stays at the base rate).
"""

from __future__ import annotations

import random
import re
import sqlite3

import pytest
from scipy.stats import binomtest

from attack_oracle import RawOracle
from guard_fixtures import BLOCKS, add_snapshot, band, make_instance
from sekisho.guard import Guard, QueryRefused, regions
from sekisho.guard.holds import resume
from sekisho.guard.upload_regions import change_variance

SEXES = ("男", "女")
CUTS = list(range(8, 68))   # both parts of every (block, sex) region stay >= k


def _split_queries(spelling: str, cut: int) -> list[str]:
    """The queries one partition of every (block, sex) region takes, in one spelling."""
    if spelling == "group_key":
        return [f"SELECT block, sex, age >= {cut} AS part, COUNT(*) AS n FROM residents GROUP BY block, sex, part"]
    if spelling == "where":
        return [f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= {cut} GROUP BY block, sex",
                f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age < {cut} GROUP BY block, sex"]
    if spelling == "filter":
        return [f"SELECT block, sex, COUNT(*) FILTER (WHERE age >= {cut}) AS n_old, "
                f"COUNT(*) FILTER (WHERE age < {cut}) AS n_young FROM residents GROUP BY block, sex"]
    if spelling == "fixed_region":
        return [f"SELECT '{b}' AS block, sex, age >= {cut} AS part, COUNT(*) AS n FROM residents "
                f"WHERE block = '{b}' GROUP BY sex, part" for b in BLOCKS]
    raise ValueError(spelling)


def _regions(oracle, spelling: str, cuts: list[int], state: dict) -> dict | None:
    """Per (block, sex): the mean over the partitions of the sum of its released parts
    (partitions with a suppressed part are skipped); None once the analyst is paused."""
    sums: dict[tuple, list[float]] = {}
    for cut in cuts:
        parts: dict[tuple, list] = {}
        for sql in _split_queries(spelling, cut):
            if state["paused"]:
                return None
            try:
                rows = oracle.query(sql, user="ana").table.to_pylist()
            except QueryRefused as refusal:
                state["paused"] = state["paused"] or refusal.code == "paused_for_review"
                return None
            finally:
                getattr(oracle, "flush", lambda: None)()
            for r in rows:
                values = [v for key, v in r.items() if key.startswith("n")]
                parts.setdefault((r["block"], r["sex"]), []).extend(values)
        for region, values in parts.items():
            if values and all(v is not None for v in values):
                sums.setdefault(region, []).append(float(sum(values)))
    return {region: sum(v) / len(v) for region, v in sums.items()}


def decomposition_attack(inst, oracle, *, spelling: str, uploads: int = 3, cuts: int = 24,
                         seed: int = 41) -> dict:
    """``uploads`` uploads of one newcomer per block (13 each); on every snapshot the
    (block, sex) regions are averaged over ``cuts`` partitions. Returns the accuracy, the
    base rate, the binomial p-value and whether the analyst was paused."""
    rng = random.Random(seed)
    chosen = rng.sample(CUTS, cuts)
    state = {"paused": False}
    before = _regions(oracle, spelling, chosen, state)
    secrets, correct = [], 0
    for u in range(uploads):
        values = [SEXES[(i + u) % 2] for i in range(len(BLOCKS))]
        rng.shuffle(values)
        add_snapshot(inst, [(f"dec{u}_{i}", f"hdec{u}_{i}", sex, 30 + i, band(30 + i), "世帯主",
                             f"282014{(i * 11) % 150:04d}", block, True, rng.randrange(256))
                            for i, (block, sex) in enumerate(zip(BLOCKS, values))])
        after = _regions(oracle, spelling, chosen, state)
        for block, value in zip(BLOCKS, values):
            change = {s: (after[(block, s)] - before[(block, s)])
                      if after and before and (block, s) in after and (block, s) in before else 0.0
                      for s in SEXES}
            top = max(change.values())
            guess = rng.choice(sorted(s for s in SEXES if change[s] == top))
            correct += guess == value
            secrets.append(value)
        before = after
    n = len(secrets)
    base = max(secrets.count(s) for s in SEXES) / n
    return {"n": n, "base": base, "accuracy": correct / n, "paused": state["paused"],
            "p_value": binomtest(correct, n, base, alternative="greater").pvalue}


SPELLINGS = ("group_key", "where", "filter", "fixed_region")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_attack_succeeds_against_the_raw_store(tmp_path, spelling):
    inst = make_instance(tmp_path / "raw", persons=3000, seed=41, planted=False)
    result = decomposition_attack(inst, RawOracle(inst), spelling=spelling, cuts=4)
    assert result["accuracy"] == 1.0, result


def _alerts(inst, name: str = "upload_decomposition") -> list[dict]:
    return [e["details"] for e in inst.audit.entries(type="alert") if e["details"].get("alert") == name]


def _pausing_only_on_upload_decomposition(inst) -> None:
    """Holds on, but only this alert pauses: the tests below show it alone stops the
    attack (the within-minutes ``differencing`` alert also sees the ``where`` spelling
    here, because the test's uploads are seconds apart, not a month)."""
    text = inst.policy_path.read_text(encoding="utf-8")
    inst.policy_path.write_text(re.sub(r"(?m)^(\s+pause_on:).*$", r"\1 [upload_decomposition]", text),
                                encoding="utf-8")


def _held(home, *, seed: int):
    """An instance pausing only on this alert, a guard on it, and the attack's state."""
    inst = make_instance(home, persons=3000, seed=seed, planted=False, holds=True)
    _pausing_only_on_upload_decomposition(inst)
    return inst, Guard(inst), {"paused": False}


def test_without_holds_the_averaging_beats_the_base_rate_and_is_alerted(tmp_path):
    """The noise alone does not stop it (60 cut points, 104 newcomers over 8 uploads:
    0.69-0.83 over five instances, p < 1e-4): the hold must — and the alert is audited
    regardless."""
    inst = make_instance(tmp_path / "nohold", persons=3000, seed=41, planted=False)
    guard = Guard(inst)
    try:
        result = decomposition_attack(inst, guard, spelling="group_key", uploads=8, cuts=60)
    finally:
        guard.close()
    assert not result["paused"]
    assert result["accuracy"] >= result["base"] + 0.10 and result["p_value"] < 0.01, result
    alerts = _alerts(inst)
    assert len(alerts) == 1 and "pause" not in alerts[0], alerts


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_hold_stops_averaging_across_uploads(tmp_path, spelling):
    inst = make_instance(tmp_path / spelling, persons=3000, seed=41, planted=False, holds=True)
    _pausing_only_on_upload_decomposition(inst)
    guard = Guard(inst)
    try:
        result = decomposition_attack(inst, guard, spelling=spelling, uploads=4, cuts=60)
    finally:
        guard.close()
    assert result["paused"], result
    assert result["accuracy"] < result["base"] + 0.10 or result["p_value"] >= 0.01, result
    alerts = _alerts(inst)
    assert len(alerts) == 1 and alerts[0]["pause"] is True, alerts
    assert len(set(alerts[0]["snapshots"])) == 2


def test_averaging_one_side_then_splitting_the_other_once_is_checked(tmp_path):
    """The exact counts of the snapshot before the upload (many splits) and one split
    after it leave a variance of 6 on each region's change: checked, and paused."""
    inst, guard, state = _held(tmp_path / "asym", seed=42)
    try:
        _regions(guard, "group_key", CUTS[:30], state)
        add_snapshot(inst, [("asym0", "hasym0", "女", 33, band(33), "世帯主", "2820140007", BLOCKS[3], True, 7)])
        _regions(guard, "group_key", CUTS[30:31], state)
        guard.flush()
        assert not state["paused"]   # the hold applies from the next query
        with pytest.raises(QueryRefused) as refused:
            guard.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block", user="ana")
        assert refused.value.code == "paused_for_review"
    finally:
        guard.close()
    assert len(_alerts(inst)) == 1
    assert change_variance(float("inf"), 1.0, 9.0) < 8 <= change_variance(float("inf"), 0.0, 9.0)


def test_resume_forgets_the_checks_and_a_continued_attack_pauses_again(tmp_path):
    inst, guard, state = _held(tmp_path / "resume", seed=43)
    try:
        _regions(guard, "group_key", CUTS[:10], state)
        add_snapshot(inst, [("res0", "hres0", "男", 40, band(40), "世帯主", "2820140009", BLOCKS[5], True, 9)])
        _regions(guard, "group_key", CUTS[:10], state)
        assert state["paused"]
        assert resume(inst, "ana")["alert"] == "upload_decomposition"
        state["paused"] = False
        _regions(guard, "group_key", CUTS[10:14], state)
        assert state["paused"]
    finally:
        guard.close()
    assert [a.get("pause") for a in _alerts(inst)] == [True, True]


def test_block_level_reruns_across_a_realistic_month_are_checked_and_not_alerted(tmp_path):
    """An analyst who splits block x sex many ways every month: every block gains k or
    more persons in a month (Himeji: ~1,200 転入), so no region changed by 1..k-1 and the
    checks on the store (recorded) raise nothing."""
    inst = make_instance(tmp_path / "honest", persons=3000, seed=44, planted=False, holds=True)
    # on 3,000 persons, cut points a year apart split (block, sex) cells that differ by a
    # few persons: a differencing pair per cell (cell_pairs), not what this test is about
    _pausing_only_on_upload_decomposition(inst)
    guard = Guard(inst)
    state = {"paused": False}
    rng = random.Random(3)
    try:
        _regions(guard, "group_key", CUTS[:12], state)
        add_snapshot(inst, [(f"m{i}", f"hm{i}", sex, 30, band(30), "世帯主", f"282014{i % 150:04d}", block, True,
                             rng.randrange(256)) for i, (block, sex) in
                            enumerate((b, s) for b in BLOCKS for s in SEXES for _ in range(10))])
        _regions(guard, "group_key", CUTS[:12], state)
        guard.flush()
    finally:
        guard.close()
    assert not state["paused"]
    assert not _alerts(inst)
    with sqlite3.connect(inst.state_path) as con:
        checks = con.execute("SELECT changed FROM guard_region_checks WHERE user = 'ana'").fetchall()
    assert checks and all(changed == 0 for (changed,) in checks), checks


# ---- the regions and partitions of a release (pure) ---------------------------------------

def _row(guard, sql: str) -> tuple[str, list]:
    """The boundary's row SQL and its non-empty cells' key codes (read on the raw store)."""
    snap = guard.snapshots.current()
    plan = guard.plans.plan(sql, user="ana", role="analyst", snapshot=snap.id,
                            catalog=guard._catalog("analyst", snap))
    (bp,) = plan.boundaries
    keys = [f'"__g{j}"' for j in range(len(bp.group_keys))]
    cells = RawOracle(guard.instance).query(f"SELECT DISTINCT {', '.join(keys)} FROM ({bp.row_sql})").table \
        if keys else None
    return bp.row_sql, regions.key_codes(cells.to_pydict() if cells is not None else {}, len(keys))


@pytest.fixture(scope="module")
def small_guard(tmp_path_factory):
    inst = make_instance(tmp_path_factory.mktemp("regions") / "inst", persons=600, seed=5, planted=False)
    guard = Guard(inst)
    yield guard
    guard.close()


def _weights(guard, sql: str) -> dict[str, float]:
    return {p.region_class: p.weight for p in regions.partitions(*_row(guard, sql))}


def test_every_spelling_of_a_split_partitions_the_same_class(small_guard):
    """block x sex split at 40: as a group key, in WHERE (each half), as FILTERed counts,
    with a table alias, through a subquery — one class (block, sex), weights in splits
    in two."""
    key = _weights(small_guard, "SELECT block, sex, age >= 40 AS p, COUNT(*) AS n FROM residents "
                                "GROUP BY block, sex, p")
    where = _weights(small_guard, "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= 40 "
                                  "GROUP BY block, sex")
    filtered = _weights(small_guard, "SELECT block, sex, COUNT(*) FILTER (WHERE age >= 40) AS a, "
                                     "COUNT(*) FILTER (WHERE age < 40) AS b FROM residents GROUP BY block, sex")
    aliased = _weights(small_guard, "SELECT r.block, r.sex, r.age >= 40 AS p, COUNT(*) AS n FROM residents r "
                                    "GROUP BY r.block, r.sex, p")
    nested = _weights(small_guard, "SELECT block, sex, COUNT(*) AS n FROM (SELECT * FROM residents "
                                   "WHERE age >= 40) t GROUP BY block, sex")
    # one region written another way: the same class
    fixed = _weights(small_guard, "SELECT sex, age >= 40 AS p, COUNT(*) AS n FROM residents "
                                  "WHERE block = '安富' GROUP BY sex, p")
    spelled = _weights(small_guard, "SELECT sex, 40 <= age AS p, COUNT(*) AS n FROM residents "
                                    "WHERE block IN ('安富') GROUP BY sex, p")
    assert set(fixed) == set(spelled)
    (block_sex,) = {p.region_class for p in regions.partitions(*_row(
        small_guard, "SELECT block, sex, age >= 40 AS p, COUNT(*) AS n FROM residents GROUP BY block, sex, p"))
        if p.kept_keys == (0, 1)}
    assert block_sex in set(where) & set(filtered) & set(aliased) & set(nested)
    assert key[block_sex] == 1.0 and filtered[block_sex] == 1.0 and aliased[block_sex] == 1.0
    assert where[block_sex] == 0.5 and nested[block_sex] == 0.5
    # a finer split says less: block x sex by its age bands, by its 町丁目 (counted per
    # region, not over the city: a block holds a few of the 150 町丁目)
    raw = RawOracle(small_guard.instance)
    bands = _weights(small_guard, "SELECT block, sex, age_band, COUNT(*) AS n FROM residents "
                                  "GROUP BY block, sex, age_band")
    cells, regions_ = (raw.query(f"SELECT COUNT(DISTINCT ({keys})) AS n FROM residents").table[0][0].as_py()
                       for keys in ("block, sex, age_band", "block, sex"))
    assert bands[block_sex] == pytest.approx(2 * regions_ / cells)
    chomes = _weights(small_guard, "SELECT block, sex, chome_code, COUNT(*) AS n FROM residents "
                                   "GROUP BY block, sex, chome_code")
    per_region = raw.query("SELECT COUNT(DISTINCT (block, sex, chome_code)) * 1.0 / COUNT(DISTINCT (block, sex)) "
                           "AS n FROM residents").table[0][0].as_py()
    assert chomes[block_sex] == pytest.approx(2 / per_region) and 2 / per_region > 2 / 150


def test_a_condition_that_changes_nobody_adds_no_item(small_guard):
    """Padding every query with a different no-op condition would make each its own
    class; the influence rule leaves such a condition out, and the regions are read
    from the row SELECT as answered."""
    result = small_guard.query("SELECT block, sex, COUNT(*) AS n FROM residents WHERE age > -7 "
                               "GROUP BY block, sex", user="ana")
    assert result.summary["conditions_left_out"]
    row_sql, key_parts = _row(small_guard, "SELECT block, sex, COUNT(*) AS n FROM residents GROUP BY block, sex")
    small_guard.flush()
    with sqlite3.connect(small_guard.instance.state_path) as con:
        recorded = {c for (c,) in con.execute("SELECT class FROM guard_region_partitions WHERE user = 'ana'")}
    plain = {p.region_class for p in regions.partitions(row_sql, key_parts)}
    assert plain <= recorded


def test_region_sql_names_the_contributors_of_each_region(small_guard):
    row_sql, key_parts = _row(small_guard, "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= 40 "
                                           "GROUP BY block, sex")
    by_kept = {(p.kept_keys, p.kept_conjuncts): p for p in regions.partitions(row_sql, key_parts)}
    sql = regions.region_sql(row_sql, (0, 1), ())
    assert "WHERE" not in sql and '"__g0"' in sql and '"__g1"' in sql and '"__pid"' in sql
    assert ((0, 1), ()) in by_kept and ((0,), (0,)) in by_kept
    raw = RawOracle(small_guard.instance).query(f"SELECT COUNT(*) AS n FROM ({sql})").table.to_pylist()[0]["n"]
    assert raw == RawOracle(small_guard.instance).query("SELECT COUNT(*) AS n FROM residents").table[0][0].as_py()


def test_pieces_of_one_column_are_weighed_by_depth():
    """Disjoint pieces (yearly windows, one filter per type) make one partition; cut
    points with both sides, one per cut; the weight is the depth."""
    def piece(sql: str) -> str:
        import json

        import sqlglot

        return json.dumps([regions._range(sqlglot.parse_one(sql, read="duckdb"))[1]], ensure_ascii=False)

    windows = [piece(f"idou_ym BETWEEN '{y}-11' AND '{y + 1}-10'") for y in range(2021, 2026)]
    assert regions.depth(windows) == 1
    assert regions.depth([piece(f"idou_type = '{t}'") for t in ("転入", "転出", "出生")]) == 1
    cuts = [piece(f"age >= {t}") for t in range(20, 80)] + [piece(f"age < {t}") for t in range(20, 80)]
    assert regions.depth(cuts) == 60
    assert regions.depth([piece("age >= 40"), piece("age < 40")]) == 1
    assert regions.depth([piece("age >= 40"), piece("age <= 40")]) == 2   # both hold 40
    assert regions.depth([piece("age IN (1, 2, 3)"), piece("age = 2"), piece("age BETWEEN 2 AND 5")]) == 3
    assert regions._range(__import__("sqlglot").parse_one("age >= 40 OR sex = '男'")) is None
    # boxes over two columns: one filter per 異動 type and year is one partition
    import json

    grid = [json.dumps([[[t, t, True, True]], [[f"{y}-11", f"{y + 1}-10", True, True]]], ensure_ascii=False)
            for t in ("転入", "転出") for y in range(2021, 2026)]
    assert regions.depth(grid) == 1


def test_a_class_whose_regions_did_not_change_is_checked_and_not_alerted(tmp_path):
    """An upload that changes nobody in the class (here: nobody at all in residents; the
    whole view, with no key, is a class too) is no pair."""
    from guard_fixtures import new_snapshot

    inst = make_instance(tmp_path / "same", persons=3000, seed=45, planted=False, holds=True)
    _pausing_only_on_upload_decomposition(inst)   # (as above: cut points a year apart)
    guard = Guard(inst)
    state = {"paused": False}
    whole = [f"SELECT age >= {cut} AS part, COUNT(*) AS n FROM residents GROUP BY part" for cut in CUTS[:12]]
    try:
        _regions(guard, "group_key", CUTS[:12], state)
        for sql in whole:
            guard.query(sql, user="ana")
        new_snapshot(inst, lambda con: None)   # the same data under a new snapshot id
        _regions(guard, "group_key", CUTS[:12], state)
        for sql in whole:
            guard.query(sql, user="ana")
        guard.flush()
    finally:
        guard.close()
    assert not state["paused"] and not _alerts(inst)
    with sqlite3.connect(inst.state_path) as con:
        checks = con.execute("SELECT changed FROM guard_region_checks WHERE user = 'ana'").fetchall()
    assert len(checks) >= 3 and all(changed == 0 for (changed,) in checks), checks


def _brute_depth(boxes: list[str]) -> int:
    """The depth by trying every point just below, at and just above each end point."""
    import itertools
    import json

    parsed = [json.loads(b) for b in boxes]

    def contains(interval, value, side):
        lo, hi, lo_closed, hi_closed = interval
        above = lo is None or value > lo or (value == lo and (side > 0 or (side == 0 and lo_closed)))
        below = hi is None or value < hi or (value == hi and (side < 0 or (side == 0 and hi_closed)))
        return above and below
    axes = []
    for d in range(len(parsed[0])):
        values = sorted({v for b in parsed for lo, hi, _, _ in b[d] for v in (lo, hi) if v is not None})
        axes.append([(v, s) for v in values for s in (-1, 0, 1)] or [(0, 0)])
    return max(sum(all(any(contains(i, v, s) for i in b[d]) for d, (v, s) in enumerate(point)) for b in parsed)
               for point in itertools.product(*axes))


def test_depth_agrees_with_trying_every_point():
    import json

    rng = random.Random(9)
    for trial in range(300):
        dims = rng.choice((1, 1, 2))
        boxes = []
        for _ in range(rng.randint(1, 12)):
            box = []
            for _ in range(dims):
                kind = rng.choice(("cut", "range", "points"))
                if kind == "cut":
                    t = rng.randint(0, 9)
                    box.append([rng.choice([[t, None, True, False], [t, None, False, False],
                                            [None, t, False, False], [None, t, False, True]])])
                elif kind == "range":
                    lo = rng.randint(0, 9)
                    box.append([[lo, lo + rng.randint(0, 4), rng.random() < 0.5, rng.random() < 0.5]])
                else:
                    box.append([[v, v, True, True] for v in sorted(rng.sample(range(10), rng.randint(1, 3)))])
            boxes.append(json.dumps(box))
        assert regions.depth(boxes) == _brute_depth(boxes), (trial, boxes)
