"""Condition influence per cell (issue 15, classes 1, 3 and 4; ``sekisho.guard.cell_influence``).

The attack class: a condition that changes many persons city-wide (so the query-wide rule
keeps it) but one person inside one cell. Two cells of one query, of two boundaries, or of
two queries then have the same contributors or differ by the target alone, and consistent
noise answers equal sets equally. Each variant is run against the raw store (it must
succeed: a real attack) and against the guard (no better than a constant guess); a
property test checks per target that the target's cell is never released in two ways that
differ; and the one-scan counts agree with the general comparison they replace.
"""

from __future__ import annotations

import pytest

from attack_oracle import RawOracle, assert_no_better_than_base, assert_real_attack, unique_targets
from attack_oracle import accuracy_attack as _accuracy_attack, fresh_analyst as _fresh_analyst
from guard_fixtures import truth
from sekisho.guard import QueryRefused


@pytest.fixture(scope="module")
def inst(own_city):
    return own_city


raw = pytest.fixture(scope="module", name="raw")(lambda inst: RawOracle(inst))


def accuracy_attack(oracle, inst, guess_of):
    return _accuracy_attack(oracle, inst, guess_of, prefix="cell")


def _rows(oracle, user, sql):
    return oracle.query(sql, user=user).table.to_pylist()


def _differ(a, b):
    """'女' when the two releases of the target's cell differ, '男' when they are equal,
    None when either is suppressed (no idea)."""
    if a is None or b is None:
        return None
    return "女" if a != b else "男"


# ---- the variants --------------------------------------------------------------------------
def _pair_in_cell(oracle, user, sql, key, value):
    mine = [r for r in _rows(oracle, user, sql) if r[key] == value]
    return _differ(mine[0]["a"], mine[0]["b"]) if mine else None


def label_twin(oracle, user, chome, age):
    # the target in one large cell with everyone of another age; two counts of it
    return _pair_in_cell(oracle, user, f"SELECT CASE WHEN age = {age} THEN chome_code ELSE '{chome}' END AS g, "
                                       f"COUNT(*) AS a, COUNT(*) FILTER (WHERE age <> {age} OR sex = '男') AS b "
                                       "FROM residents GROUP BY 1", "g", chome)


def constant_twin(oracle, user, chome, age):
    # two FILTER cells per 町丁目, the second one age further, men of the target's age kept
    return _pair_in_cell(oracle, user, f"SELECT chome_code, COUNT(*) FILTER (WHERE age >= {age}) AS a, "
                                       f"COUNT(*) FILTER (WHERE age >= {age} AND (age >= {age + 1} OR sex = '男')) "
                                       "AS b FROM residents GROUP BY chome_code", "chome_code", chome)


def union_twin(oracle, user, chome, age):
    # the same pair as two boundaries of one query
    g = f"CASE WHEN age = {age} THEN chome_code ELSE '{chome}' END"
    rows = _rows(oracle, user, f"SELECT 'a' AS part, {g} AS g, COUNT(*) AS n FROM residents GROUP BY 2 UNION ALL "
                               f"SELECT 'b' AS part, {g} AS g, COUNT(*) AS n FROM residents "
                               f"WHERE age <> {age} OR sex = '男' GROUP BY 2")
    mine = {r["part"]: r["n"] for r in rows if r["g"] == chome}
    return _differ(mine.get("a"), mine.get("b"))


def two_queries(oracle, user, chome, age):
    # ... and as two queries (the first one has no condition at all)
    g = f"CASE WHEN age = {age} THEN chome_code ELSE '{chome}' END"
    first = [r["n"] for r in _rows(oracle, user, f"SELECT {g} AS g, COUNT(*) AS n FROM residents GROUP BY 1")
             if r["g"] == chome]
    second = [r["n"] for r in _rows(oracle, user, f"SELECT {g} AS g, COUNT(*) AS n FROM residents "
                                                  f"WHERE age <> {age} OR sex = '男' GROUP BY 1") if r["g"] == chome]
    return _differ(first[0] if first else None, second[0] if second else None)


def moved_by_group_key(oracle, user, chome, age):
    # a group key that moves the women of the target's age out of their 町丁目 (many
    # city-wide): the target's 町丁目 loses her, and only her
    plain = [r["n"] for r in _rows(oracle, user, "SELECT chome_code AS g, COUNT(*) AS n FROM residents GROUP BY 1")
             if r["g"] == chome]
    moved = [r["n"] for r in _rows(oracle, user, f"SELECT CASE WHEN age = {age} AND sex = '女' THEN 'A' "
                                                 "ELSE chome_code END AS g, COUNT(*) AS n FROM residents GROUP BY 1")
             if r["g"] == chome]
    return _differ(plain[0] if plain else None, moved[0] if moved else None)


def _which_cell(oracle, user, chome, counted, where="TRUE"):
    # the target's own cell (町丁目 x sex) is the one a condition changes: by its value
    # against the count without it, or by being suppressed while the other is not
    plain = {r["sex"]: r["n"] for r in _rows(oracle, user, "SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                                           f"WHERE {where} GROUP BY 1, 2") if r["chome_code"] == chome}
    other = {r["sex"]: r["n"] for r in _rows(oracle, user, counted) if r["chome_code"] == chome}
    marked = [sex for sex in ("女", "男") if plain.get(sex) is not None and
              (other.get(sex) is None or other[sex] != plain[sex])]
    return marked[0] if len(marked) == 1 else None


def where_one_atom(oracle, user, chome, age):
    # ``age <> a`` made TRUE adds the target to her cell and nobody to the other sex's;
    # suppressing the changed cell named it (accuracy 1.0 before cell_widening)
    return _which_cell(oracle, user, chome, "SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                            f"WHERE age <> {age} GROUP BY 1, 2")


def where_padded(oracle, user, chome, age):
    # the same beside a condition that changes k or more in every cell
    return _which_cell(oracle, user, chome, "SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                            f"WHERE age <> {age} AND (age >= 15 OR age = {age}) GROUP BY 1, 2",
                       where=f"age >= 15 OR age = {age}")


def filter_one_atom(oracle, user, chome, age):
    # ... as a FILTER, whose FALSE neighbour changes everyone
    return _which_cell(oracle, user, chome, f"SELECT chome_code, sex, COUNT(*) FILTER (WHERE age <> {age}) AS n "
                                            "FROM residents GROUP BY 1, 2")


def filter_one_atom_released(oracle, user, chome, age):
    # ... reading the released values too: a cell released at k or more and answered
    # otherwise with the FILTER. Its FALSE neighbour changes the cell by all it counts:
    # decided on the release's noise, that is the released count where the target is not
    # (known to be k or more) and a fresh draw where she is (``decision_counts``)
    plain = {r["sex"]: r["n"] for r in _rows(oracle, user, "SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                                           "GROUP BY 1, 2") if r["chome_code"] == chome}
    other = {r["sex"]: r["n"] for r in _rows(oracle, user, "SELECT chome_code, sex, COUNT(*) FILTER (WHERE age <> "
                                                           f"{age}) AS n FROM residents GROUP BY 1, 2")
             if r["chome_code"] == chome}
    marked = [sex for sex, n in plain.items() if n is not None and other.get(sex) != n]
    sure = [sex for sex in marked if plain[sex] >= 10] or marked
    return sure[0] if len(sure) == 1 else None


def key_condition_beside_where(oracle, user, chome, age):
    # a group key that is a condition (``age >= 40``) beside ``WHERE age <> a``: the key's
    # neighbours (everyone moved to one side) change the target's side by its count with
    # or without her; decided on the query as asked, the cells of her sex moved and the
    # other sex's never did (41 of 41 guesses right before the per-cell rule's two tiers)
    keyed = "SELECT chome_code, sex, age >= 40 AS old, COUNT(*) AS n FROM residents {} GROUP BY 1, 2, 3"
    plain = {(r["sex"], r["old"]): r["n"] for r in _rows(oracle, user, keyed.format(""))
             if r["chome_code"] == chome}
    other = {(r["sex"], r["old"]): r["n"] for r in _rows(oracle, user, keyed.format(f"WHERE age <> {age}"))
             if r["chome_code"] == chome}
    marked = {sex for (sex, old), n in plain.items() if n is not None and other.get((sex, old)) != n}
    return marked.pop() if len(marked) == 1 else None


def doubled_atoms(oracle, user, chome, age):
    # two conditions that only together exclude the target: no single replacement adds her
    return _which_cell(oracle, user, chome, "SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                            f"WHERE (age <> {age} OR is_current AND NOT is_current) AND "
                                            f"(age < {age} OR age > {age} OR age > 200) GROUP BY 1, 2")


def band_key_moved(oracle, user, chome, age):
    # keys of public domains (age_band is a band of age, sex): the target's band cell of
    # her sex loses her, and only her; the per-cell rule reasons over those domains
    # (enumerated_keys) — it must not tell the two sexes' cells apart
    lo = min(age, 100) // 5 * 5
    band = "100+" if age >= 100 else f"{lo}-{lo + 4}"
    to = "'0-4'" if band != "0-4" else "'5-9'"
    plain = {r["sex"]: r["n"] for r in _rows(oracle, user, "SELECT chome_code, age_band AS band, sex, COUNT(*) AS n "
                                                           "FROM residents GROUP BY 1, 2, 3")
             if r["chome_code"] == chome and r["band"] == band}
    moved = {r["sex"]: r["n"] for r in _rows(oracle, user, f"SELECT chome_code, CASE WHEN age = {age} THEN {to} "
                                                           "ELSE age_band END AS band, sex, COUNT(*) AS n "
                                                           "FROM residents GROUP BY 1, 2, 3")
             if r["chome_code"] == chome and r["band"] == band}
    marked = [sex for sex in ("女", "男") if plain.get(sex) is not None and
              (moved.get(sex) is None or moved[sex] != plain[sex])]
    return marked[0] if len(marked) == 1 else None


VARIANTS = [label_twin, constant_twin, union_twin, two_queries, moved_by_group_key, where_one_atom, where_padded,
            filter_one_atom, filter_one_atom_released, key_condition_beside_where, doubled_atoms,
            band_key_moved]


@pytest.mark.parametrize("attack", VARIANTS, ids=lambda f: f.__name__)
def test_a_condition_small_in_one_cell_reveals_nothing(attack, guard, raw, inst):
    assert_real_attack(*accuracy_attack(raw, inst, attack)[::2])
    assert_no_better_than_base(*accuracy_attack(guard, inst, attack))


def test_several_rows_per_person_as_well(guard, raw, inst):
    # resident_tax (a row per person and tax year): the target alone in their (block, age
    # band), in one large cell of their block with everyone of other bands; a person's
    # rows are counted once per cell. Per target: the two counts of that cell differ on the
    # raw store for every woman, and the guard suppresses them or answers them equally.
    targets = truth(inst, "SELECT block, age_band, any_value(sex) FROM resident_tax GROUP BY 1, 2 "
                          "HAVING COUNT(DISTINCT person_id) = 1 ORDER BY 1, 2")
    user = _fresh_analyst(inst, "cell")
    women = 0
    for block, band, sex in targets:
        sql = (f"SELECT CASE WHEN age_band = '{band}' THEN block ELSE '{block}' END AS g, COUNT(*) AS a, "
               f"COUNT(*) FILTER (WHERE age_band <> '{band}' OR sex = '男') AS b FROM resident_tax GROUP BY 1")
        (truth_row,) = [r for r in raw.query(sql).table.to_pylist() if r["g"] == block]
        assert (truth_row["a"] != truth_row["b"]) == (sex == "女"), sql
        women += sex == "女"
        rows = [r for r in guard.query(sql, user=user).table.to_pylist() if r["g"] == block]
        # a suppressed cell of a key without a public domain is not shown at all
        assert all((r["a"] is None and r["b"] is None) or r["a"] == r["b"] for r in rows), (sql, rows)
    assert len(targets) >= 8 and women >= 4


@pytest.mark.parametrize("attack", [key_condition_beside_where, filter_one_atom, filter_one_atom_released],
                         ids=lambda f: f.__name__)
def test_the_guesses_an_attack_makes_are_right_as_often_as_chance(attack, guard, raw, inst):
    # the accuracy bar cannot see a leak that names a few targets for sure (7 of 36 guesses,
    # all right, is within chance of a constant guess), nor one whose guesses are always
    # wrong (then flipped): the guesses an attack makes must be right as often as chance
    # (binomial, two-sided, 1%), over 100 targets
    from scipy.stats import binomtest

    user = _fresh_analyst(inst, "sure")
    made = right = 0
    for chome, age, sex in unique_targets(inst, limit=100):
        assert attack(raw, user, chome, age) == sex
        guess = attack(guard, user, chome, age)
        made += guess is not None
        right += guess == sex
    assert made == 0 or binomtest(right, made, 0.5).pvalue >= 0.01, (right, made)


def test_no_condition_is_exempt_from_a_cell_a_moved_key_brings_rows_into(guard, inst):
    # ``untouched``: ``age <> a`` cannot change the ``age >= 40`` FALSE cells (a is 40 or
    # more) — of the query as asked. Answered with a key's neighbour that moves everyone to
    # FALSE, the cell holds the target too, and exempting the condition there answered it
    # without her (the cell then differed from the query without the WHERE by her alone)
    user = _fresh_analyst(inst, "moved")
    snap = guard.snapshots.current()
    checked = 0
    for chome, age, sex in [t for t in unique_targets(inst, limit=150) if t[1] >= 40][:25]:
        sql = (f"SELECT chome_code, sex, age >= 40 AS old, COUNT(*) AS n FROM residents WHERE age <> {age} "
               "GROUP BY 1, 2, 3")
        guard.query(sql, user=user)
        (bp,) = guard.plans.plan(sql, user=user, role="analyst", snapshot=snap.id,
                                 catalog=guard._catalog("analyst", snap)).boundaries
        worlds = guard.verdicts.verdict((user, snap.id, bp.row_sql), lambda: pytest.fail("not kept")).cell_worlds
        key = (chome, sex, False)
        applied = worlds.applied(key)
        assert worlds.movers() and worlds.untouched, sql
        if applied & worlds.movers():
            assert applied == worlds.kept - worlds.large.get(key, frozenset()), (sql, applied)
            checked += 1
    assert checked >= 3, checked


def test_the_target_cell_is_never_released_two_ways(guard, raw, inst):
    # per target rather than in aggregate: a, b of the target's cell are equal (or both
    # suppressed), whatever the target is (on the raw store they differ for every woman)
    user = _fresh_analyst(inst, "cell")
    women = alike = 0
    for chome, age, sex in unique_targets(inst, limit=60):
        sql = (f"SELECT CASE WHEN age = {age} THEN chome_code ELSE '{chome}' END AS g, COUNT(*) AS a, "
               f"COUNT(*) FILTER (WHERE age <> {age} OR sex = '男') AS b FROM residents GROUP BY 1")
        (truth_row,) = [r for r in raw.query(sql).table.to_pylist() if r["g"] == chome]
        assert (truth_row["a"] != truth_row["b"]) == (sex == "女")
        women += sex == "女"
        result = guard.query(sql, user=user)
        if result.summary["conditions_left_out"]:
            # a condition left out query-wide (few of that age city-wide, near k by the
            # snapshot's noise): then a and b no longer differ by the target alone
            continue
        rows = [r for r in result.table.to_pylist() if r["g"] == chome]
        # answered alike (``age <> a`` made TRUE, the one neighbour changing fewer than k
        # there, applied in that cell), or suppressed (a key without a public domain: its
        # suppressed cells are not shown)
        assert all(r["a"] == r["b"] for r in rows), (sql, rows)
        alike += bool(rows)
    assert women >= 10 and alike >= 20


def test_cells_a_condition_does_not_touch_stay_as_they_are(guard, inst):
    # a condition that changes nobody in a cell leaves it released (WHERE age >= 18 by
    # age band: the adult bands), and a condition that changes many in every cell nothing
    user = _fresh_analyst(inst, "cell")
    result = guard.query("SELECT age_band, COUNT(*) AS n FROM residents WHERE age >= 18 GROUP BY age_band", user=user)
    released = {r["age_band"]: r["n"] for r in result.table.to_pylist()}
    assert all(released[b] is not None for b in ("30-34", "40-44", "50-54"))
    result = guard.query("SELECT block, COUNT(*) AS n FROM residents WHERE sex = '女' GROUP BY block", user=user)
    assert result.summary["cell_influence_checked"]
    assert all(r["n"] is not None for r in result.table.to_pylist())


@pytest.mark.parametrize("sql", [
    "SELECT CASE WHEN age = 40 THEN chome_code ELSE '2820140001' END AS g, COUNT(*) AS a, "
    "COUNT(*) FILTER (WHERE age <> 40 OR sex = '男') AS b FROM residents GROUP BY 1",
    "SELECT CASE WHEN age = 33 AND sex = '女' THEN 'A' ELSE block END AS g, COUNT(*) AS n FROM residents "
    "WHERE age > 20 GROUP BY 1",
    "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age BETWEEN 20 AND 60 AND chome_code IN "
    "('2820140001', '2820140002', '2820140003') GROUP BY block, sex",
    "SELECT block, COUNT(*) AS n, SUM(income_levy) AS s FROM resident_tax WHERE age_band <> '20-24' GROUP BY block",
    "SELECT idou_type, COUNT(*) AS n FROM movements WHERE idou_year >= 2023 OR sex = '男' GROUP BY idou_type",
], ids=["label", "moving-key", "between-in", "multi-row", "movements"])
def test_one_scan_counts_agree_with_the_general_comparison(sql, guard, inst):
    # the one-scan form (one aggregate per cell with a FILTER per neighbour) and the general
    # form (each neighbour's rows against the query's) count the same contributors and keys
    from sekisho.guard import cell_influence, hidden
    from sekisho.guard.execution import fetch
    from sekisho.guard.neighbours import neighbourhood, variant_sql
    from sekisho.guard.sqltext import DIALECT

    user = _fresh_analyst(inst, "cell")
    plan = guard.plans.plan(sql, user=user, role="analyst", snapshot=guard.snapshots.current().id,
                            catalog=guard._catalog("analyst", guard.snapshots.current()))
    snap = guard.snapshots.current()
    for bp in plan.boundaries:
        columns = [hidden.group_key(j) for j in range(len(bp.group_keys))] + \
            [hidden.argument(j) for j, agg in enumerate(bp.aggregates) if agg.arg is not None]
        base, _, neighbours = neighbourhood(bp.row, frozenset({"person_id", "household_id"}), render=False)
        assert neighbours
        person_unique = snap.is_person_unique(bp.personal_view, "person_id")
        one = fetch(snap, cell_influence.cell_influence_sql(base, neighbours, columns, person_unique=person_unique))
        keep = cell_influence.counted_neighbours(base, neighbours)
        general = fetch(snap, cell_influence.general_sql(base.sql(dialect=DIALECT),
                                                         {i: variant_sql(base, neighbours[i]) for i in keep}, columns,
                                                         [c for c in columns if c.startswith("__g")]))
        assert _summed(one) == _summed(general), sql
        assert _summed(one), sql


def _summed(counts) -> dict:
    groups = sorted(c for c in counts if c.startswith("__g"))
    out: dict = {}
    keys = list(zip(*(counts[g].to_pylist() for g in groups))) if groups else []
    for w, key, n, ck in zip(counts["__w"].tolist(), keys, counts["__n"].tolist(), counts["__ck"].tolist()):
        t = out.setdefault((int(w), key), [0, 0])
        t[0] += int(n)
        t[1] = (t[1] + int(ck)) % 256
    return {k: tuple(v) for k, v in out.items() if v[0]}


def test_which_way_a_condition_is_left_out_tells_nothing(guard, inst):
    # WHERE (C AND age = a AND sex = '女') OR pad: the sex condition's TRUE neighbour changes
    # the target when a man, its FALSE neighbour when a woman; both are small, and the one
    # left out (named in the summary with TRUE/FALSE) must not be the one that changes
    # nobody. The summary's left-out list, read as a feature, guesses no better than base
    # (in-sample majority per feature: the most an attacker with known persons gets).
    import collections
    import statistics

    user = _fresh_analyst(inst, "cell")
    seen = []
    for chome, age, sex in unique_targets(inst, limit=80):
        sql = (f"SELECT COUNT(*) AS n FROM residents WHERE (chome_code = '{chome}' AND age = {age} AND sex = '女') "
               "OR (block = '灘' AND age >= 30)")
        try:
            summary = guard.query(sql, user=user).summary
            feature = tuple(sorted((d["condition"].rsplit(".", 1)[-1].split(" ")[0], d["as"])
                                   for d in summary["conditions_left_out_as"]))
        except QueryRefused as refusal:
            feature = refusal.code
        seen.append((feature, sex))
    by_feature = collections.defaultdict(collections.Counter)
    for feature, sex in seen:
        by_feature[feature][sex] += 1
    hits = sum(c.most_common(1)[0][1] for c in by_feature.values())
    common = statistics.mode(sex for _, sex in seen)
    assert_no_better_than_base(hits, sum(sex == common for _, sex in seen), len(seen))


# ---- two aggregates a constant apart in one query (class 4) ---------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 20,000-person city: targets unique on (町丁目, age) with a dozen younger and a dozen
    older neighbours in their 町丁目, so that ``age <= a`` and ``age <= a - 1`` each change
    k or more."""
    from guard_fixtures import make_instance
    from sekisho.guard import Guard

    inst = make_instance(tmp_path_factory.mktemp("big") / "inst", persons=20000, seed=7, planted=False)
    targets = truth(inst, """SELECT chome_code, age, any_value(sex) FROM residents r GROUP BY 1, 2
      HAVING COUNT(*) = 1
      AND (SELECT COUNT(*) FROM residents s WHERE s.chome_code = r.chome_code AND s.age < r.age) >= 12
      AND (SELECT COUNT(*) FROM residents s WHERE s.chome_code = r.chome_code AND s.age > r.age) >= 12
      ORDER BY hash(chome_code || age)""")
    seen: set = set()
    targets = [t for t in targets if not (t[0] in seen or seen.add(t[0]))][:36]
    guard = Guard(inst)
    yield inst, guard, targets
    guard.close()


def _range_pair(oracle, user, chome, age, spell):
    pad = "(block = '灘' AND age >= 10)"
    if spell == "one_cell":   # no groups: the pair itself holds the woman or nobody
        p1 = f"(chome_code = '{chome}' AND age <= {age} AND sex = '女') OR {pad}"
        p0 = f"(chome_code = '{chome}' AND age <= {age - 1} AND sex = '女') OR {pad}"
        (row,) = _rows(oracle, user, f"SELECT COUNT(*) FILTER (WHERE {p1}) AS n1, COUNT(*) FILTER (WHERE {p0}) AS n0 "
                                     "FROM residents")
        return "女" if None in (row["n1"], row["n0"]) or row["n1"] != row["n0"] else "男"
    p1 = f"(chome_code = '{chome}' AND age <= {age}) OR {pad}"
    p0 = f"(chome_code = '{chome}' AND age <= {age - 1}) OR {pad}"
    if spell == "filter":
        sql = f"SELECT sex, COUNT(*) FILTER (WHERE {p1}) AS n1, COUNT(*) FILTER (WHERE {p0}) AS n0 FROM residents GROUP BY sex"
    else:
        sql = (f"SELECT sex, COUNT(CASE WHEN {p1} THEN 1 END) AS n1, COUNT(CASE WHEN {p0} THEN 1 END) AS n0 "
               "FROM residents GROUP BY sex")
    rows = {r["sex"]: r for r in _rows(oracle, user, sql)}
    # the side without the target has the same contributors twice: answered exactly alike;
    # the target's side differs — or is suppressed, which would show it just as well
    marked = [sex for sex in ("女", "男") if sex not in rows or None in (rows[sex]["n1"], rows[sex]["n0"])
              or rows[sex]["n1"] != rows[sex]["n0"]]
    return marked[0] if len(marked) == 1 else None


@pytest.mark.parametrize("spell", ["filter", "case", "one_cell"])
def test_two_aggregates_a_constant_apart_reveal_nothing(spell, big):
    # ``age <= a`` and ``age <= a - 1`` each change many persons and are no neighbours of each
    # other; the two counts differ by the target in the target's sex only
    import statistics

    inst, guard, targets = big
    assert len(targets) >= 30
    common = statistics.mode(s for *_, s in targets)
    base = sum(s == common for *_, s in targets)
    for oracle, real in ((RawOracle(inst), True), (guard, False)):
        user = _fresh_analyst(inst, "pair")
        hits = 0
        for chome, age, sex in targets:
            try:
                guess = _range_pair(oracle, user, chome, age, spell)
            except QueryRefused:
                guess = None
            hits += (guess or common) == sex
        if real:
            assert_real_attack(hits, len(targets))
        else:
            assert_no_better_than_base(hits, base, len(targets))


def test_aggregates_of_the_same_persons_or_far_apart_stay_released(guard, inst):
    # the pair check leaves ordinary tables alone: a count beside a count of women, of the
    # old, and two counts of the same condition
    user = _fresh_analyst(inst, "cell")
    result = guard.query("SELECT block, COUNT(*) AS n, COUNT(*) FILTER (WHERE sex = '女') AS women, "
                         "COUNT(*) FILTER (WHERE age >= 65) AS old, COUNT(CASE WHEN age >= 65 THEN 1 END) AS old2 "
                         "FROM residents GROUP BY block", user=user)
    rows = result.table.to_pylist()
    assert rows and all(r["n"] is not None and r["women"] is not None for r in rows)
    assert all(r["old"] == r["old2"] for r in rows)


UNIT_SCOPE_QUERIES = [
    "SELECT size, COUNT(*) AS n FROM (SELECT household_id, COUNT(*) AS size FROM residents WHERE age >= 3 "
    "GROUP BY household_id) AS h WHERE size >= 2 GROUP BY size",
    "SELECT CASE WHEN kids >= 1 AND old = 0 THEN '子あり' WHEN old >= 1 THEN '高齢' ELSE 'その他' END AS kind, "
    "COUNT(*) AS n FROM (SELECT household_id, COUNT_IF(age < 15) AS kids, COUNT_IF(age >= 65) AS old "
    "FROM residents WHERE is_current GROUP BY household_id) AS h GROUP BY 1",
    # a CASE as a branch's result (the 家族類型 of reports/06 has one)
    "SELECT kind, COUNT(*) AS n FROM (SELECT household_id, CASE WHEN COUNT(*) = 1 THEN '単独' "
    "WHEN COUNT_IF(age >= 18) = 2 AND COUNT(*) = 2 + COUNT_IF(age < 18) THEN CASE WHEN COUNT_IF(age < 18) = 0 "
    "THEN '二人' ELSE '子あり' END ELSE 'その他' END AS kind FROM residents WHERE is_current "
    "GROUP BY household_id) AS h GROUP BY 1",
]


def _household_types_query() -> str:
    # reports/06's 家族類型 (this city has no registration months: its residents now)
    from sekisho.reports.sql import households_at, resident_at
    households = households_at("2025-10").replace(resident_at("2025-10"), "(is_current AND (sex IS NULL OR age >= 0))")
    return f"SELECT family_type, COUNT(*) AS n FROM {households} AS h GROUP BY family_type"


UNIT_SCOPE_IDS = ["size", "kind", "nested", "family_type"]


def _boundary(sql, guard, inst):
    """(snapshot, the query's one boundary, its counted columns) as the guard plans it."""
    from sekisho.guard import hidden

    snap = guard.snapshots.current()
    plan = guard.plans.plan(sql, user=_fresh_analyst(inst, "cell"), role="analyst", snapshot=snap.id,
                            catalog=guard._catalog("analyst", snap))
    (bp,) = plan.boundaries
    columns = [hidden.group_key(j) for j in range(len(bp.group_keys))] + \
        [hidden.argument(j) for j, agg in enumerate(bp.aggregates) if agg.arg is not None]
    return snap, bp, columns


@pytest.mark.parametrize("sql", UNIT_SCOPE_QUERIES + [_household_types_query()], ids=UNIT_SCOPE_IDS)
def test_unit_scope_counts_agree_with_the_general_comparison(sql, guard, inst):
    # households: one row per household with every world's features, counted per cell as
    # over one table; the general comparison counts the same households
    from sekisho.guard import cell_influence
    from sekisho.guard.execution import fetch
    from sekisho.guard.neighbours import MAX_ATOMS_UNIT_SCOPE, neighbourhood, variant_sql
    from sekisho.guard.sqltext import DIALECT

    snap, bp, columns = _boundary(sql, guard, inst)
    base, _, neighbours = neighbourhood(bp.row, frozenset({"person_id", "household_id"}), MAX_ATOMS_UNIT_SCOPE, render=False)
    one = cell_influence.cell_influence_sql(base, neighbours, columns, person_unique=True)
    assert one is not None and not one.startswith("WITH __s AS"), one[:200]   # not the general form
    keep = cell_influence.counted_neighbours(base, neighbours)
    general = cell_influence.general_sql(base.sql(dialect=DIALECT), {i: variant_sql(base, neighbours[i]) for i in keep},
                                         columns, [c for c in columns if c.startswith("__g")])
    assert {k: v[0] for k, v in _summed(fetch(snap, one)).items()} == \
        {k: v[0] for k, v in _summed(fetch(snap, general)).items()}, sql


@pytest.mark.parametrize("sql", UNIT_SCOPE_QUERIES[:2] + [_household_types_query()], ids=["size", "kind", "family_type"])
def test_second_tiers_counted_in_one_statement_count_what_each_counts_alone(sql, guard, inst):
    # several row trees over one unit scope (the query with different neighbours applied, as
    # a query's second tiers are) in one statement: per tree the same counts and cell keys
    # as its own statement, whatever else shares the unit columns
    from sekisho.guard import cell_influence
    from sekisho.guard.execution import fetch
    from sekisho.guard.neighbours import MAX_ATOMS_UNIT_SCOPE, apply, neighbourhood
    from sekisho.guard.protect.cells_frame import take

    snap, bp, columns = _boundary(sql, guard, inst)
    identifiers = frozenset({"person_id", "household_id"})
    base, _, neighbours = neighbourhood(bp.row, identifiers, MAX_ATOMS_UNIT_SCOPE, render=False)
    trees = [bp.row, apply(base, neighbours[:1]), apply(base, neighbours[2:3]), apply(base, neighbours[1:2])]
    prepared = []
    for tree in trees:
        b, _, n = neighbourhood(tree, identifiers, MAX_ATOMS_UNIT_SCOPE, render=False)
        prepared.append((b, n, cell_influence.counted_neighbours(b, n)))
    prepared = [p for p in prepared if p[2]]
    assert len(prepared) >= 3
    sql_all, offsets = cell_influence.units_batch_sql(prepared, columns)
    assert sql_all.count('GROUP BY "residents"."household_id"') == 1   # one GROUP BY of the view for all
    together = fetch(snap, sql_all)
    which = together["__w"].astype(int)
    for (b, n, keep), offset in zip(prepared, offsets):
        mask = (which >= offset) & (which < offset + len(n))
        mine = take(together, mask)
        mine["__w"] = which[mask] - offset
        alone = fetch(snap, cell_influence.cell_influence_sql(b, n, columns, person_unique=True, keep=keep))
        assert _summed(mine) == _summed(alone) and _summed(alone), sql


@pytest.mark.parametrize("sql", UNIT_SCOPE_QUERIES + [_household_types_query()], ids=UNIT_SCOPE_IDS)
def test_a_unit_scopes_own_cells_counted_with_its_neighbours_are_its_cells(sql, guard, inst):
    # the query's own cells read from the per-cell statement's GROUP BY of the view
    # (``units_and_cells_sql``, so the cells scan is not run): the same cells, contributors
    # and cell keys as the cells SQL, and the neighbours' rows as ``cell_influence_sql``'s
    import numpy as np

    from sekisho.guard import cell_influence, hidden
    from sekisho.guard.cells import cells_sql
    from sekisho.guard.execution import fetch
    from sekisho.guard.influence import MAX_ATOMS_UNIT_SCOPE, _split_own
    from sekisho.guard.neighbours import neighbourhood

    snap, bp, columns = _boundary(sql, guard, inst)
    base, _, neighbours = neighbourhood(bp.row, frozenset({"person_id", "household_id"}), MAX_ATOMS_UNIT_SCOPE,
                                        render=False)
    keep = cell_influence.counted_neighbours(base, neighbours)
    groups = [c for c in columns if c.startswith("__g")]
    both = cell_influence.units_and_cells_sql(base, neighbours, columns, keep)
    assert both is not None
    per_cell, own = _split_own(fetch(snap, both), len(neighbours), groups)
    cells = fetch(snap, cells_sql(bp, person_unique=True, twins=True))
    assert sorted(cells) == sorted(own)   # group keys, __n, __ck: nothing else to count

    def rows(c):
        keys = zip(*(c[g].to_pylist() for g in groups))
        return sorted(zip(keys, np.asarray(c[hidden.CONTRIBUTORS]).tolist(), np.asarray(c[hidden.CELL_KEY]).tolist()),
                      key=repr)
    assert rows(own) == rows(cells) and rows(cells), sql
    # and as protection takes them, keyed by the cells SQL's types (a HUGEINT key read as
    # Decimal made the per-cell rule decide otherwise than on the cells scan's BIGINT)
    from sekisho.guard.protection import _keyed_as_asked
    typed = _keyed_as_asked(own, bp, snap)
    assert [typed[g].type for g in groups] == [cells[g].type for g in groups]
    alone = fetch(snap, cell_influence.cell_influence_sql(base, neighbours, columns, person_unique=True, keep=keep))
    assert _summed(per_cell) == _summed(alone), sql


@pytest.mark.parametrize("sql", UNIT_SCOPE_QUERIES, ids=UNIT_SCOPE_IDS[:3])
def test_a_unit_scope_answered_from_its_own_cells_is_answered_as_from_its_cells_scan(sql, inst, monkeypatch):
    # the whole answer (values, statuses, intervals, summary) with the cells from the rule's
    # scan and with a cells scan of their own: the same, and one statement fewer
    from sekisho.guard import Guard, influence, protection
    answers, statements = [], []
    fetch = protection.fetch
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(influence, "units_and_cells_sql", lambda *a, **kw: None)
        ran = []
        monkeypatch.setattr(protection, "fetch", lambda *a, **kw: ran.append(a[1]) or fetch(*a, **kw))
        g = Guard(inst)
        try:
            result = g.query(sql, user=_fresh_analyst(inst, "own"))
        finally:
            g.close()
        # (rows in any order: the query has no ORDER BY)
        answers.append((sorted(zip(result.table.to_pylist(), result.cells.to_pylist()), key=repr),
                        {key: value for key, value in result.summary.items() if key != "query_id"}))
        statements.append(len(ran))
    assert answers[0] == answers[1] and answers[0][0]
    assert statements[0] == statements[1] - 1, statements


# ---- cells answered without the conditions that change them by fewer than k (cell_widening) --
def _companion(result, column):
    from sekisho.protocol import cells_by_column

    companion = cells_by_column(result.cells)[column]
    return [dict(zip(("status", "low", "high"), t)) for t in
            zip(*(companion[c].to_pylist() for c in ("status", "low", "high")))]


def test_the_mark_of_a_cell_answered_without_a_condition_does_not_name_the_target(guard, raw, inst):
    # ``age <> a`` changes the target's cell by one and the other sex's by none: both
    # cells are answered without it and marked alike (marking only the first would name
    # her sex); on the raw store the two cells differ from the plain count in one sex only
    user = _fresh_analyst(inst, "mark")
    checked = 0
    for chome, age, sex in unique_targets(inst, limit=100):
        sql = f"SELECT chome_code, sex, COUNT(*) AS n FROM residents WHERE age <> {age} GROUP BY 1, 2"
        plain = {r["sex"]: r["n"] for r in raw.query("SELECT chome_code, sex, COUNT(*) AS n FROM residents "
                                                     "GROUP BY 1, 2").table.to_pylist() if r["chome_code"] == chome}
        asked = {r["sex"]: r["n"] for r in raw.query(sql).table.to_pylist() if r["chome_code"] == chome}
        assert [s for s in plain if plain[s] != asked.get(s, 0)] == [sex]
        result = guard.query(sql, user=user)
        if result.summary["conditions_left_out"]:
            continue
        rows = result.table.to_pylist()
        mine = {r["sex"]: st for r, st in zip(rows, _companion(result, "n")) if r["chome_code"] == chome}
        if len(mine) == 2:
            assert mine["女"]["status"] == mine["男"]["status"], (chome, age, mine)
            checked += 1
    assert checked >= 20


def test_a_condition_few_in_a_cell_is_not_applied_there_and_the_cell_says_so(guard, raw, inst):
    # ``WHERE age >= 1`` by block x band x sex: in a 0-4 cell with a few babies the cell
    # counts them too (as the query without the condition does); every cell the condition
    # changes by fewer than k — by none included — is marked widened, with an interval
    # that holds the count asked for; a 0-4 cell with k or more babies is the query's own,
    # and so is every cell of another band (no one there can be 0)
    user = _fresh_analyst(inst, "mark")
    sql = "SELECT block, age_band, sex, COUNT(*) AS n FROM residents WHERE age >= 1 GROUP BY 1, 2, 3"
    open_sql = "SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2, 3"
    asked = {tuple(r.values())[:3]: r["n"] for r in raw.query(sql).table.to_pylist()}
    babies = {tuple(r[:3]): r[3] for r in truth(inst, "SELECT block, age_band, sex, COUNT(*) FROM residents "
                                                       "WHERE age = 0 GROUP BY 1, 2, 3")}
    result = guard.query(sql, user=user)
    opened = {tuple(r.values())[:3]: r["n"] for r in guard.query(open_sql, user=user).table.to_pylist()}
    few = own = outside = none = 0
    for row, st in zip(result.table.to_pylist(), _companion(result, "n")):
        key = tuple(row.values())[:3]
        true = asked.get(key, 0)
        if row["n"] is None:
            continue
        assert st["low"] <= true <= st["high"], (key, true, row["n"], st)
        if 1 <= babies.get(key, 0) <= 4 and true >= 10:
            # (fewer than k by any noise: 4 + D = 9; 5 babies and a draw of +5 are k, and
            # the condition is applied there, as the rule says)
            assert st["status"] == "widened" and row["n"] == opened[key], (key, row["n"], opened[key])
            few += 1
        elif babies.get(key, 0) >= 15:
            assert st["status"] == "released" and abs(row["n"] - true) <= 5, (key, true, row["n"])
            own += 1
        elif key[1] != "0-4":
            # age_band is a band of age: ``age >= 1`` cannot change these cells whatever
            # the data (enumerated_keys), so they are the query's own and unmarked
            assert st["status"] == "released" and abs(row["n"] - true) <= 5, (key, st)
            outside += 1
        elif babies.get(key, 0) == 0 and true >= 10:
            assert st["status"] == "widened", (key, st)   # changed by none: marked as by one
            none += 1
    assert few >= 3 and outside >= 50, (few, outside, none)
    assert any("widened" in note for note in result.summary["notes_ja"])


def _one_boundary(guard, inst, sql):
    """(snapshot, the plan's one boundary, its group-key and argument columns, its row tree
    prepared, its neighbours) — what the counting functions are given."""
    from sekisho.guard import hidden
    from sekisho.guard.neighbours import neighbourhood

    user = _fresh_analyst(inst, "cell")
    snap = guard.snapshots.current()
    (bp,) = guard.plans.plan(sql, user=user, role="analyst", snapshot=snap.id,
                             catalog=guard._catalog("analyst", snap)).boundaries
    columns = [hidden.group_key(j) for j in range(len(bp.group_keys))] + \
        [hidden.argument(j) for j, agg in enumerate(bp.aggregates) if agg.arg is not None]
    base, _, neighbours = neighbourhood(bp.row, frozenset({"person_id", "household_id"}), render=False)
    return snap, bp, columns, base, neighbours


@pytest.mark.parametrize("sql", [
    "SELECT block, COUNT(*) AS n FROM residents WHERE block IN ('飾磨', '灘', '網干') AND age >= 18 GROUP BY block",
    "SELECT age, sex, COUNT(*) AS n FROM residents WHERE age BETWEEN 20 AND 40 AND sex = '女' GROUP BY age, sex",
    "SELECT age, COUNT(*) FILTER (WHERE age >= 65 OR age < 15) AS dependents FROM residents GROUP BY age",
])
def test_a_cell_deemed_untouched_is_changed_by_nobody(sql, guard, inst):
    # ``cell_widening.untouched_cells`` decides from the text and a cell's key alone that a
    # neighbour cannot change the cell; on the data, the general comparison finds nobody
    # changed there (and the test would fail if the rule marked a cell it does change)
    from sekisho.guard import cell_influence, cell_widening
    from sekisho.guard.execution import fetch
    from sekisho.guard.neighbours import variant_sql
    from sekisho.guard.sqltext import DIALECT

    snap, bp, columns, base, neighbours = _one_boundary(guard, inst, sql)
    groups = [c for c in columns if c.startswith("__g")]
    untouched = cell_widening.untouched_cells(base, neighbours)
    assert untouched, sql
    keep = cell_influence.counted_neighbours(base, neighbours)
    changed = _summed(fetch(snap, cell_influence.general_sql(base.sql(dialect=DIALECT),
                                                             {i: variant_sql(base, neighbours[i]) for i in keep},
                                                             columns, groups)))
    domain = {key for (_, key) in changed} | {tuple(r[:len(groups)]) for r in truth(
        inst, f"SELECT {', '.join(c.name for c in (k.column for k in bp.group_keys))} FROM residents GROUP BY ALL")}
    checked = 0
    for i in keep:
        if i not in untouched:
            continue
        for key in domain:
            if untouched[i](key):
                assert (i, key) not in changed, (sql, neighbours[i].atom, neighbours[i].action, key)
                checked += 1
    assert checked >= 5, checked


@pytest.mark.parametrize("sql", [
    "SELECT block, COUNT(*) AS n FROM residents WHERE age >= 18 GROUP BY block",
    "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age BETWEEN 20 AND 60 AND chome_code IN "
    "('2820140001', '2820140002', '2820140003') GROUP BY block, sex",
    "SELECT block, COUNT(CASE WHEN age >= 46 THEN 1 END) AS older, COUNT(*) AS n FROM residents GROUP BY block",
    "SELECT age_band, COUNT(*) AS n FROM residents WHERE is_current AND (sex = '女' OR age > 70) GROUP BY age_band",
])
def test_the_shared_first_round_counts_what_the_two_scans_count(sql, guard, inst):
    # influence.decide's first round and the per-cell counts from one grouped scan
    # (cell_influence.query_and_cell_sql) count exactly what the query-wide scan and the
    # per-cell scan count apart
    from sekisho.guard import cell_influence, hidden, influence
    from sekisho.guard.execution import fetch

    snap, bp, columns, base, neighbours = _one_boundary(guard, inst, sql)

    def run(q):
        return fetch(snap, q)

    shared = influence._query_and_cells(base, neighbours, lambda: cell_influence.counted_neighbours(base, neighbours),
                                        columns, snap.ptable, run)
    assert shared is not None, sql
    noisy, exact, own = influence._counted(base, neighbours, columns, True, snap.ptable, run)
    assert (shared[0], shared[1]) == (noisy, exact), sql
    assert int(shared[2][hidden.CONTRIBUTORS][0]) == int(own[hidden.CONTRIBUTORS][0])
    assert int(shared[2][hidden.CELL_KEY][0]) == int(own[hidden.CELL_KEY][0])
    apart = run(cell_influence.cell_influence_sql(base, neighbours, columns, person_unique=True))
    assert _summed(shared[3]) == _summed(apart) and _summed(apart), sql
    # the query's own cells, as its cells SQL counts them (a new query of contributor
    # counts is answered from these: protection.counts_contributors_only)
    from sekisho.guard.cells import cells_sql
    own_cells, scanned = shared[4], run(cells_sql(bp, person_unique=True))
    assert _cell_rows(own_cells, columns) == _cell_rows(scanned, columns) and _cell_rows(own_cells, columns), sql


def _cell_rows(cells, columns) -> list:
    groups = [c for c in columns if c.startswith("__g")]
    return sorted(zip(*(cells[g].to_pylist() if hasattr(cells[g], "to_pylist") else list(cells[g]) for g in groups),
                      (int(v) for v in cells["__n"]), (int(v) for v in cells["__ck"])), key=repr)


@pytest.mark.parametrize("sql", [
    "SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= 18 AND block IN ('灘', '網干', '広畑') GROUP BY 1, 2",
    "SELECT age_band, COUNT(*) AS n, COUNT(DISTINCT person_id) AS persons FROM residents "
    "WHERE sex = '女' AND age BETWEEN 20 AND 64 GROUP BY 1",
])
def test_a_new_count_is_answered_from_the_influence_scan_as_the_cells_scan_answers_it(sql, guard, inst, monkeypatch):
    # a new grouped count (no condition left out) takes its cells from the condition-
    # influence scan instead of a cells scan of its own; asked again (verdict cached, no
    # own cells kept) it runs the cells scan: the two answers are the same, cell for cell
    from sekisho.guard import protection

    scans = []
    real = protection.fetch

    def counting(snap, q, **kw):
        if kw.get("prepared_for") is not None:
            scans.append(q)
        return real(snap, q, **kw)

    monkeypatch.setattr(protection, "fetch", counting)
    user = _fresh_analyst(inst, "own")
    first = guard.query(sql, user=user)
    snap = guard.snapshots.current()
    (bp,) = guard.plans.plan(sql, user=user, role="analyst", snapshot=snap.id,
                             catalog=guard._catalog("analyst", snap)).boundaries
    own_scan = protection.ThresholdProtection._cells_sql(bp, True)
    assert own_scan not in scans, scans   # (a cell answered as a wider query has a scan of its own)
    again = guard.query(sql, user=user)
    assert scans.count(own_scan) == 1, (own_scan, scans)
    assert first.table.to_pylist() == again.table.to_pylist() and first.table.num_rows >= 3
    assert first.cells.to_pylist() == again.cells.to_pylist()
    assert {k: v for k, v in first.summary.items() if k != "query_id"} == \
        {k: v for k, v in again.summary.items() if k != "query_id"}


def test_deciding_which_neighbours_select_nothing_leaves_the_variants_as_made():
    # a variant that carries a tree of its own is written in full by the one-scan counts
    # (neighbour_counts._local): every atom of a 22-band CASE evaluated once per neighbour
    # per row instead of once per row — notebook 01 as an analyst took 156 s instead of 35
    from sqlglot import parse_one

    from sekisho.guard import cell_influence, neighbour_counts
    from sekisho.guard.neighbours import neighbourhood

    row = parse_one("SELECT CASE WHEN r.age >= 80 THEN 'old' WHEN r.age >= 40 THEN 'mid' ELSE 'young' END AS __g0, "
                    "r.person_id AS __pid, r._rkey AS __rkey FROM residents AS r WHERE r.is_current AND r.sex = '女'",
                    read="duckdb")
    base, _, neighbours = neighbourhood(row, render=False)
    kept = cell_influence.counted_neighbours(base, neighbours)
    assert 0 < len(kept) < len(neighbours)        # the top-level conjuncts made FALSE select nothing
    assert all(v.tree is None for v in neighbours)
    sql = neighbour_counts.influence_sql(base, neighbours, ["__g0"], person_unique=True)
    assert sql.count(">= 80") == 1, sql             # each atom computed once per row


def test_a_repeated_splice_takes_each_cell_from_its_world_whatever_the_rows_order():
    # cell_widening keeps where each cell comes from with the world cells it was found in:
    # the same cells in another order, or the world's cells computed again (another row
    # order), splice the same values into each cell
    import numpy as np
    import pyarrow as pa

    import gc

    from sekisho.guard.cell_splice import OWN, Resolution, WorldCells, splice

    def cells(keys, n):
        return WorldCells({"__g0": pa.array(keys), "__n": np.array(n), "__ck": np.array([v * 3 for v in n])})

    # a answered as asked, b and c from the world W, d from a world beyond the limit
    resolution = Resolution({("a",): OWN, ("b",): "W", ("c",): "W", ("d",): None}, {})
    mine = {"a": 1, "b": 2, "c": 3, "d": 4}

    def spliced(order, worlds):
        out, suppressed = splice(cells(order, [mine[k] for k in order]), [(k,) for k in order], ["__g0"],
                                 resolution, worlds)
        return dict(zip(out["__g0"].to_pylist(), np.asarray(out["__n"]).tolist())), suppressed

    expected = ({"a": 1, "b": 20, "c": 30, "d": 0}, 1)
    world = {"W": cells(["c", "b", "x"], [30, 20, 99])}
    assert spliced(["a", "b", "c", "d"], world) == expected
    assert spliced(["d", "c", "a", "b"], world) == expected                       # cells in another order
    assert spliced(["b", "a", "d", "c"], {"W": cells(["x", "b", "c"], [99, 20, 30])}) == expected   # W again
    assert resolution._sources is not None      # (the memo was used) ...
    del world
    gc.collect()
    assert resolution._sources[0]["W"]() is None   # ... and keeps no world's cells alive

