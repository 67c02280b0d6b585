"""Releases before and after an upload (issue 15): a differencing pair.

The attacker knows who arrived between two uploads and a quasi-identifier of each
(chome_code, age); they ask the same padded query (the newcomer's chome plus chomes
where nobody arrived, so every cell passes k) before and after the upload and guess the
newcomer's sex from the cell that moved. With one perturbation table for every snapshot
the cells the upload left unchanged kept their exact answers and only the newcomer's
cell moved; the guard now draws a fresh table per snapshot, so every cell moves and
what is left to the attacker is a +1 in one cell under two independent noise draws,
which the policy's noise keeps near chance for one pair; averaging many pairs pauses the
analyst (``upload_differencing``).

The same attack runs against the raw store (``RawOracle``: the same SQL, no
protection), where it must succeed, so it is a real attack.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.stats import binomtest

from attack_oracle import RawOracle
from guard_fixtures import BLOCKS, add_snapshot, band, make_instance, truth
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.holds import resume
from sekisho.guard.protect.cellkey import PerturbationTable
from sekisho.policy import load_policy

CHOMES = [f"282014{j:04d}" for j in range(150)]
SEXES = ("男", "女")


def _cells(oracle, sql: str, key: str) -> dict:
    rows = oracle.query(sql, user="ana").table.to_pylist()
    return {r[key]: r["n"] for r in rows}


def _guess(before: dict, after: dict, domain, rng: random.Random) -> dict[str, str]:
    """Two guessing rules: ``moved`` — the one cell whose answer changed, if exactly one
    did (what one table for every snapshot gave away); ``larger`` — the cell whose answer
    grew most (ties broken at random)."""
    diffs = {v: after[v] - before[v] for v in domain if before.get(v) is not None and after.get(v) is not None}
    if not diffs:
        pick = rng.choice(list(domain))
        return {"moved": pick, "larger": pick}
    top = max(diffs.values())
    larger = rng.choice(sorted(v for v, d in diffs.items() if d == top))
    moved = [v for v, d in diffs.items() if d != 0]
    return {"moved": moved[0] if len(moved) == 1 else larger, "larger": larger}


def upload_attack(inst, oracles: dict, *, uploads: int = 3, per_upload: int = 12, pads: int = 3,
                  target: str = "sex", seed: int = 15) -> dict:
    """Run the attack against every oracle at once (same data, same newcomers, same
    queries) over ``uploads`` uploads of ``per_upload`` newcomers each (one per chome, so
    a padded query holds one newcomer). Returns ``n``, ``base`` (accuracy of the best
    constant guess for these newcomers) and per oracle: ``accuracy`` (the better rule),
    accuracy per rule, ``p_value`` (one-sided binomial test against ``base``) and
    ``unchanged_identical`` (share of the cells without a newcomer whose answer the
    upload left identical)."""
    rng = random.Random(seed)
    domain = SEXES if target == "sex" else tuple(BLOCKS)
    correct = {name: {"moved": 0, "larger": 0} for name in oracles}
    identical = {name: [0, 0] for name in oracles}
    tie_rngs = {name: random.Random(seed + 1) for name in oracles}
    secrets: list[str] = []
    for u in range(uploads):
        homes = rng.sample(range(len(CHOMES)), per_upload)      # one newcomer per chome in an upload
        pool = [j for j in range(len(CHOMES)) if j not in homes]   # chomes where nobody arrives
        values = ([SEXES[i % 2] for i in range(per_upload)] if target == "sex"
                  else [rng.choice(BLOCKS) for _ in range(per_upload)])
        rng.shuffle(values)
        newcomers, queries = [], []
        for i, (home, value) in enumerate(zip(homes, values)):
            age = rng.randrange(20, 70)
            sex = value if target == "sex" else rng.choice(SEXES)
            block = value if target == "block" else rng.choice(BLOCKS)
            newcomers.append((f"new{u}_{i}", f"hnew{u}_{i}", sex, age, band(age), "世帯主", CHOMES[home],
                              block, True, rng.randrange(256)))
            chomes = [CHOMES[home]] + [CHOMES[j] for j in rng.sample(pool, pads)]
            in_list = ", ".join(f"'{c}'" for c in sorted(chomes))
            queries.append(f"SELECT {target}, COUNT(*) AS n FROM residents "
                           f"WHERE chome_code IN ({in_list}) GROUP BY {target}")
        before = {name: [_cells(o, q, target) for q in queries] for name, o in oracles.items()}
        add_snapshot(inst, newcomers)
        after = {name: [_cells(o, q, target) for q in queries] for name, o in oracles.items()}
        for name in oracles:
            for b, a, value in zip(before[name], after[name], values):
                for rule, guess in _guess(b, a, domain, tie_rngs[name]).items():
                    correct[name][rule] += guess == value
                same = [b[v] == a[v] for v in domain
                        if v != value and b.get(v) is not None and a.get(v) is not None]
                identical[name][0] += sum(same)
                identical[name][1] += len(same)
        secrets += values
    n = len(secrets)
    base = max(secrets.count(v) for v in domain) / n
    out = {"n": n, "base": base}
    for name, rules in correct.items():
        best = max(rules.values())
        out[name] = {"accuracy": best / n, "rules": {r: c / n for r, c in rules.items()},
                     "p_value": binomtest(best, n, base, alternative="greater").pvalue,
                     "unchanged_identical": identical[name][0] / max(identical[name][1], 1)}
    return out


def fresh_draw_accuracy(table: PerturbationTable) -> float:
    """What the ``larger`` rule can reach when every cell gets a fresh draw per snapshot:
    P(1 + X > Y) (ties: half), X and Y independent differences of two draws from the
    table's noise distribution (every column holds the same multiset of values)."""
    values, counts = np.unique(table.count_table[0], return_counts=True)
    p = dict(zip(values.tolist(), (counts / counts.sum()).tolist()))
    diff: dict[int, float] = {}
    for a, pa_ in p.items():
        for b, pb in p.items():
            diff[a - b] = diff.get(a - b, 0.0) + pa_ * pb
    return sum(px * py * (1.0 if 1 + x > y else 0.5 if 1 + x == y else 0.0)
               for x, px in diff.items() for y, py in diff.items())


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    """The attack with 240 newcomers over 3 uploads, against the guard and the raw store."""
    inst = make_instance(tmp_path_factory.mktemp("uploads") / "inst", persons=3000, seed=21, planted=False)
    guard, raw = Guard(inst), RawOracle(inst)
    try:
        result = upload_attack(inst, {"guard": guard, "raw": raw}, uploads=3, per_upload=80)
        result["fresh_draw_accuracy"] = fresh_draw_accuracy(guard.ptable)
    finally:
        guard.close()
    return result


def test_the_attack_succeeds_against_the_raw_store(attack):
    """A real attack: with no protection the newcomer's cell is the only one that moves."""
    assert attack["n"] >= 30
    assert attack["raw"]["accuracy"] >= 0.97, attack
    assert attack["raw"]["unchanged_identical"] == 1.0


def test_cells_an_upload_leaves_unchanged_get_a_fresh_draw(attack):
    """With one table for every snapshot all of them kept their answers (share 1.0) and the
    ``moved`` rule read the newcomer's cell off (~0.9); now they are identical only when
    two independent draws happen to agree (~0.1 at the policy's D=5, V=9)."""
    assert attack["guard"]["unchanged_identical"] < 0.5, attack
    assert attack["guard"]["rules"]["moved"] < 0.75, attack


def test_the_guard_leaks_no_more_than_two_fresh_draws_allow(attack):
    """What is left is a +1 in one cell under two independent draws: the attacker's
    accuracy stays within 4 standard errors of what that allows (0.56 at the policy's
    D=5, V=9)."""
    expected, n = attack["fresh_draw_accuracy"], attack["n"]
    assert attack["guard"]["accuracy"] <= expected + 4 * math.sqrt(expected * (1 - expected) / n), attack


def test_newcomers_attributes_stay_near_the_base_rate(attack):
    """The issue's bar (below base + 0.10), held by the mechanism: one pair under the
    policy's noise (D=5, V=9) is worth 0.564 against 0.5 (at D=2, V=1 it was 0.686, which
    fails here). The measured accuracy of 240 newcomers has a standard error of ~0.032,
    so its point estimate straddles the bar from one instance secret to the next (0.55-0.63
    seen); that it stays within what the mechanism allows is the test above, and the
    averaging that would sharpen it pauses the analyst (below)."""
    assert attack["fresh_draw_accuracy"] < attack["base"] + 0.10, attack
    assert attack["guard"]["accuracy"] < attack["raw"]["accuracy"] - 0.25, attack


# ---- within a snapshot: consistent; across snapshots: independent -------------------------

def test_repeated_and_rephrased_queries_agree_within_a_snapshot(tmp_path):
    inst = make_instance(tmp_path / "consistent", persons=3000, seed=5, planted=False)
    add_snapshot(inst, [("new0", "hnew0", "女", 41, "40-44", "世帯主", CHOMES[7], "灘", True, 201)])
    # blocks, not 町丁目: an element of the list must change each sex's cell by k or more
    # (a 町丁目's ~10 women would be a cell some neighbour changes by fewer: cell_influence)
    quoted = [f"'{c}'" for c in ("灘", "東部", "西部", "北部")]
    queries = [f"SELECT sex, COUNT(*) AS n FROM residents WHERE block IN ({', '.join(quoted)}) GROUP BY sex",
               f"SELECT sex, COUNT(*) AS n FROM residents WHERE block IN ({', '.join(reversed(quoted))}) "
               f"GROUP BY sex",
               "SELECT sex, COUNT(*) AS n FROM residents WHERE " + " OR ".join(f"block = {q}" for q in quoted)
               + " GROUP BY sex",
               f"SELECT sex, COUNT(*) AS n FROM residents WHERE is_current AND block IN ({', '.join(quoted)}) "
               f"GROUP BY sex"]   # everybody is current: the same contributors per cell
    g = Guard(inst)
    try:
        answers = [_cells(g, sql, "sex") for sql in queries + queries]
    finally:
        g.close()
    again = Guard(inst)   # a restarted guard: the table is a function of the secret and the snapshot
    try:
        answers.append(_cells(again, queries[0], "sex"))
    finally:
        again.close()
    assert all(v is not None for v in answers[0].values()), answers[0]
    assert all(a == answers[0] for a in answers), answers


def test_identical_data_in_two_snapshots_gets_different_noise(tmp_path):
    inst = make_instance(tmp_path / "same", persons=3000, seed=6, planted=False)
    sql = "SELECT chome_code, COUNT(*) AS n FROM residents GROUP BY chome_code"   # 150 cells of 20
    g = Guard(inst)
    try:
        first = _cells(g, sql, "chome_code")
        table_before = g.ptable.count_table.copy()
        raw_before = sorted(truth(inst, sql))
        add_snapshot(inst, [])   # an upload of the very same data
        assert sorted(truth(inst, sql)) == raw_before
        second = _cells(g, sql, "chome_code")
        assert not np.array_equal(g.ptable.count_table, table_before)
    finally:
        g.close()
    released = [key for key, v in first.items() if v is not None and second.get(key) is not None]
    assert len(released) >= 100
    changed = sum(first[key] != second[key] for key in released) / len(released)
    assert changed > 0.5, changed   # independent draws agree with probability ~0.27


def test_population_check_uses_the_snapshot_table(tmp_path):
    """A filter selecting exactly k persons is refused when *this snapshot's* table
    perturbs its count below k: the decision is redrawn per snapshot like every count."""
    inst = make_instance(tmp_path / "population", persons=1500, seed=8, planted=False)
    k = 10
    chomes = CHOMES[:12]
    decisions: dict[str, set] = {c: set() for c in chomes}
    g = Guard(inst)
    try:
        for upload in range(4):
            if upload:
                add_snapshot(inst, [])
            table = g.ptable
            for chome in chomes:
                sql = f"SELECT COUNT(*) AS n FROM residents WHERE chome_code = '{chome}'"
                [(n, key_sum)] = truth(inst, f"SELECT COUNT(*), SUM(_rkey) FROM residents "
                                             f"WHERE chome_code = '{chome}'")
                assert n == k
                expected = table.perturb_count(int(key_sum), n)
                try:
                    got = g.query(sql, user="ana").table.to_pylist()[0]["n"]
                except QueryRefused as refused:
                    assert refused.code == "filter_population_below_k"
                    got = None
                assert got == (expected if expected >= k else None), (upload, chome)
                decisions[chome].add(got is None)
    finally:
        g.close()
    assert any(len(d) == 2 for d in decisions.values())   # some decisions differ between snapshots


# ---- averaging pairs across an upload: the analyst is paused -------------------------------

def averaged_upload_attack(inst, oracle, *, newcomers: int = 80, pads_per_target: int = 16,
                           seed: int = 33, snapshot: bool = True) -> dict:
    """For each newcomer, ``pads_per_target`` padded queries (other pads each time: each a
    fresh, independent draw of the noise) asked before and after the upload; the newcomer's
    sex is guessed from the cell whose change, summed over the pads, is larger. This
    averages away the two draws one pair leaves. Once refused (paused), the attacker
    guesses at random. Returns the accuracy, the base rate, whether the user was paused
    and how many queries after the upload were answered. Without ``snapshot`` the newest
    snapshot already holds the newcomers (a second oracle on the same instance) and the
    "before" answers come from the one before it."""
    rng = random.Random(seed)
    homes = rng.sample(range(len(CHOMES)), newcomers)
    pool = [j for j in range(len(CHOMES)) if j not in homes]
    values = [SEXES[i % 2] for i in range(newcomers)]
    rng.shuffle(values)
    queries = []
    for home in homes:
        per_target = []
        for _ in range(pads_per_target):
            chomes = sorted([CHOMES[home]] + [CHOMES[j] for j in rng.sample(pool, 3)])
            per_target.append("SELECT sex, COUNT(*) AS n FROM residents WHERE chome_code IN ("
                              + ", ".join(f"'{c}'" for c in chomes) + ") GROUP BY sex")
        queries.append(per_target)
    paused = False

    def ask(sql):
        nonlocal paused
        if paused:
            return None
        try:
            return _cells(oracle, sql, "sex")
        except QueryRefused as refusal:
            paused = paused or refusal.code == "paused_for_review"
            return None
        finally:
            getattr(oracle, "flush", lambda: None)()

    keys = [rng.randrange(256) for _ in homes]
    if snapshot:
        before = [[ask(q) for q in per_target] for per_target in queries]
        add_snapshot(inst, [(f"avg{i}", f"havg{i}", sex, 30 + i, band(30 + i), "世帯主", CHOMES[home], BLOCKS[0],
                             True, key) for i, (home, sex, key) in enumerate(zip(homes, values, keys))])
    else:   # the raw store: the newcomers are the rows added last; the same sets without them
        before = [[_cells_without_newcomers(oracle, q) for q in per_target] for per_target in queries]
    answered = [0]

    def ask_after(sql):
        cells = ask(sql)
        answered[0] += cells is not None
        return cells

    after = [[ask_after(q) for q in per_target] for per_target in queries]
    correct = 0
    for b_list, a_list, value in zip(before, after, values):
        change = {s: 0 for s in SEXES}
        usable = 0
        for b, a in zip(b_list, a_list):
            if b is None or a is None or any(b.get(s) is None or a.get(s) is None for s in SEXES):
                continue
            usable += 1
            for s in SEXES:
                change[s] += a[s] - b[s]
        if usable:
            top = max(change.values())
            guess = rng.choice(sorted(s for s in SEXES if change[s] == top))
        else:
            guess = rng.choice(SEXES)
        correct += guess == value
    n = len(values)
    base = max(values.count(s) for s in SEXES) / n
    return {"n": n, "base": base, "accuracy": correct / n, "paused": paused, "answered_after": answered[0],
            "p_value": binomtest(correct, n, base, alternative="greater").pvalue}


def _cells_without_newcomers(raw, sql: str) -> dict:
    """The raw answer on the snapshot before the averaging attack's upload (its rows are
    the ``avg*`` persons)."""
    return _cells(raw, sql.replace("WHERE ", "WHERE person_id NOT LIKE 'avg%' AND "), "sex")


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """The averaging attack on one instance whose policy pauses on nothing (alerts are
    still audited), against the raw store and the guard."""
    inst = make_instance(tmp_path_factory.mktemp("averaged") / "inst", persons=12000, seed=23, planted=False)
    raw, guard = RawOracle(inst), Guard(inst)
    try:
        result = {"guard": averaged_upload_attack(inst, guard)}
        result["raw"] = averaged_upload_attack(inst, raw, snapshot=False)   # the same newcomers
    finally:
        guard.close()
    result["alerts"] = [e["details"] for e in inst.audit.entries(type="alert")
                        if e["details"].get("alert") == "upload_differencing"]
    return result


def test_averaging_pairs_across_an_upload_is_a_real_attack(averaged):
    """Against the raw store the newcomer's sex is read off; against the guard without
    holds, averaging sixteen pairs per newcomer beats one pair's ~0.56 (theory 0.75; over
    80 newcomers significant in ~99% of instances): the noise alone does not stop it, the
    hold must — and the alert is raised (audited) regardless."""
    raw, guard = averaged["raw"], averaged["guard"]
    assert not raw["paused"] and not guard["paused"]
    assert raw["accuracy"] >= 0.97, raw
    assert guard["accuracy"] >= guard["base"] + 0.10 and guard["p_value"] < 0.01, guard
    assert len(averaged["alerts"]) == 1 and "pause" not in averaged["alerts"][0], averaged["alerts"]


def test_averaging_pairs_across_an_upload_pauses_the_analyst(tmp_path):
    inst = make_instance(tmp_path / "held", persons=12000, seed=23, planted=False, holds=True)
    guard = Guard(inst)
    try:
        result = averaged_upload_attack(inst, guard, newcomers=30)
    finally:
        guard.close()
    assert result["paused"], result
    assert result["accuracy"] < result["base"] + 0.10 or result["p_value"] >= 0.01, result
    alerts = [e for e in inst.audit.entries(type="alert") if e["details"].get("alert") == "upload_differencing"]
    assert len(alerts) == 1 and alerts[0]["details"]["pause"] is True, alerts
    burst = load_policy(inst.policy_path).disclosure.alerts.upload_differencing_burst
    assert alerts[0]["details"]["pairs"] >= burst
    # paused within the first newcomers' pairs: the hold applies from the next query
    assert result["answered_after"] <= burst + 4, result
    # an admin's resume forgets the pairs (not the populations): the analyst can go on,
    # and a continued attack pairs again
    assert resume(inst, "ana")["alert"] == "upload_differencing"
    guard = Guard(inst)
    try:
        assert guard.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana").table.num_rows == 2
    finally:
        guard.close()


def test_monthly_reruns_of_large_populations_do_not_alert(tmp_path):
    """An analyst re-running block-level tabulations after an upload (populations that
    change by k or more persons, or not at all) is not an upload differencing pair."""
    inst = make_instance(tmp_path / "honest", persons=3000, seed=24, planted=False, holds=True)
    queries = [f"SELECT age_band, sex, COUNT(*) AS n FROM residents WHERE block = '{b}' GROUP BY age_band, sex"
               for b in BLOCKS] + ["SELECT sex, COUNT(*) AS n FROM residents WHERE age >= 65 GROUP BY sex"]
    guard = Guard(inst)
    try:
        for sql in queries:
            guard.query(sql, user="ana")
        rng = random.Random(5)
        # a month of a real city: every block gains k or more (Himeji: ~1,200 転入 a month)
        add_snapshot(inst, [(f"m{i}", f"hm{i}", rng.choice(SEXES), 30, band(30), "世帯主", CHOMES[i % 150],
                             BLOCKS[i % len(BLOCKS)], True, rng.randrange(256)) for i in range(13 * 10)]
                     + [(f"o{i}", f"ho{i}", "女", 70, band(70), "世帯主", CHOMES[i], BLOCKS[0], True,
                         rng.randrange(256)) for i in range(12)])
        for sql in queries:
            guard.query(sql, user="ana")
        guard.flush()
    finally:
        guard.close()
    assert not [e for e in inst.audit.entries(type="alert") if e["details"].get("alert") == "upload_differencing"]
