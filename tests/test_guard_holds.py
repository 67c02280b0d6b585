"""Holds (issue 15, class 4): in threshold mode consistent noise cannot stop averaging
over the many decompositions of one population, nor a range pair (``P AND age >= a`` /
``>= a+1``) across queries; the defence is detection that *stops* the analyst. An alert
named in ``disclosure.alerts.pause_on`` (Himeji: differencing, decomposition, upload_differencing) puts the
user on hold: every query is refused (``paused_for_review``) until an admin runs
``sekisho users resume NAME``. Each attack is run against a pass-through oracle (it
works) and against the guard (the analyst is paused before it does).

Alerts are recorded on the guard's bookkeeping thread after the answer, so a hold applies
from the next query once recorded; the attacks call ``guard.flush()`` after each query
(an attacker who is faster gets the few answers the thread is behind, no more)."""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections import Counter

import duckdb
import pytest
from click.testing import CliRunner

from attack_oracle import RawOracle, RawResult
from guard_fixtures import make_instance, truth
from sekisho.cli.common import os_user_name
from sekisho.guard import Guard, QueryRefused
from sekisho.guard import alert_state
from sekisho.guard import alerts as guard_alerts
from sekisho.policy import PolicyError, load_instance_policy, load_policy
from sekisho.state import set_role

GUESS = 5   # the attacker's guess for a cell it could not estimate (middle of 1..9)


@pytest.fixture()
def inst(tmp_path):
    return make_instance(tmp_path / "inst", holds=True)   # the Himeji policy: pause_on differencing, decomposition


@pytest.fixture()
def guard(inst):
    g = Guard(inst)
    yield g
    g.close()


def alerts_of(inst, user):
    return [e for e in inst.audit.entries(type="alert") if e["type"] == "alert" and e["user"] == user]


def refused_code(guard, sql, user):
    with pytest.raises(QueryRefused) as info:
        guard.query(sql, user=user)
    return info.value.code


# ---- (a) averaging over decompositions ---------------------------------------------------------
def small_cells(inst, per_count=4):
    """(sex, age) cells of 1..9 persons (suppressed if asked directly), at most
    ``per_count`` of each true count, so no constant guess gets more than a few right."""
    rows = truth(inst, "SELECT sex, age, COUNT(*) FROM residents WHERE age BETWEEN 50 AND 98 "
                       "GROUP BY sex, age HAVING COUNT(*) BETWEEN 1 AND 9 ORDER BY sex, age")
    taken, cells = Counter(), []
    for sex, age, n in rows:
        if taken[n] < per_count:
            taken[n] += 1
            cells.append((sex, age, n))
    return cells


def decompositions(age: int) -> list[str]:
    """Group keys that split ``sex = S AND age >= age`` into large parts, each a fresh
    noise draw: attributes, residues of the age and cut points."""
    keys = ["", "relationship", "block", "age_band", "age % 2, relationship", "age % 3, relationship"]
    keys += [f"age % {m}" for m in range(2, 8)]
    return keys + [f"age < {b}" for b in range(age + 3, min(age + 19, 99))]


class OneConnectionOracle(RawOracle):
    """The pass-through oracle on one read-only connection (thousands of queries)."""

    def __init__(self, instance):
        super().__init__(instance)
        path = self.store.snapshots_dir / self.store.current_id() / "data.duckdb"
        self.con = duckdb.connect(str(path), read_only=True)

    def query(self, sql, *, user="", **_ignored):
        return RawResult(self.con.execute(sql).to_arrow_table())

    def close(self):
        self.con.close()


class Attacker:
    """Asks one decomposition at a time; once paused, it can ask nothing more."""

    def __init__(self, oracle, user="ana"):
        self.oracle, self.user, self.paused = oracle, user, False

    def parts(self, where, keys):
        """The released parts of one decomposition {group: count}, or None if refused."""
        if self.paused:
            return None
        select = f"{keys}, " if keys else ""
        group = f" GROUP BY {keys}" if keys else ""
        try:
            table = self.oracle.query(f"SELECT {select}COUNT(*) AS n FROM residents WHERE {where}{group}",
                                      user=self.user).table
        except QueryRefused as refusal:
            self.paused = refusal.code == "paused_for_review"
            return None
        finally:
            getattr(self.oracle, "flush", lambda: None)()
        return {tuple(v for k, v in row.items() if k != "n"): row["n"] for row in table.to_pylist()
                if row["n"] is not None}


def decomposition_attack(oracle, cells, user="ana"):
    """For each cell (sex S, age a): the cell is the difference of the padded population
    ``sex = S AND age >= a`` and the same without it (``age >= a + 1``). Parts that do
    not hold the cell are the same contributors in both (same noise, they cancel); the
    others differ by independent noise, which averaging over decompositions removes.
    Returns the share of cells whose count came out exact."""
    attacker, hits = Attacker(oracle, user), 0
    for sex, age, n in cells:
        keys = decompositions(age)
        with_cell = [attacker.parts(f"sex = '{sex}' AND age >= {age}", k) for k in keys]
        without = [attacker.parts(f"sex = '{sex}' AND age >= {age + 1}", k) for k in keys]
        diffs = [sum(w.values()) - sum(o.values()) for w, o in zip(with_cell, without)
                 if w is not None and o is not None and w.keys() == o.keys()]
        estimate = round(statistics.mean(diffs)) if diffs else GUESS
        hits += estimate == n
    return hits / len(cells)


def test_averaging_over_decompositions_pauses_the_analyst(inst, guard):
    cells = small_cells(inst)
    assert len(cells) >= 30 and max(Counter(n for _, _, n in cells).values()) <= 4
    raw = OneConnectionOracle(inst)
    assert decomposition_attack(raw, cells) >= 0.8   # the attack is real
    raw.close()
    exact = decomposition_attack(guard, cells)
    assert exact < 0.2
    hold = guard_alerts.hold_of(inst, "ana")
    # the padded population and the one without the cell differ by fewer than k persons:
    # the differencing pair (verified on the store) or the pair of decompositions stops it
    assert hold is not None and hold["alert"] in ("differencing", "decomposition")
    raised = [a for a in alerts_of(inst, "ana") if a["details"].get("pause")]
    assert len(raised) == 1 and raised[0]["details"]["alert"] == hold["alert"]
    burst = load_instance_policy(inst).disclosure.alerts.decomposition_burst
    first_cell_shapes = len(decompositions(cells[0][1]))
    answered = [e for e in inst.audit.entries(type="query", user="ana") if e["type"] == "query"]
    assert len(answered) <= first_cell_shapes + burst // 2
    assert raised[0]["details"]["raised_by"] == answered[-1]["seq"] == hold["raised_by"]
    refused = [e for e in inst.audit.entries(type="query.refused", user="ana")]
    assert [e["details"]["code"] for e in refused] == ["paused_for_review"]


def test_a_new_cut_point_or_several_decompositions_in_one_query_are_new_shapes(inst, guard):
    """Shapes keep the literals of the group keys: a new modulus (same fingerprint) is a
    new decomposition, and so is each boundary of a query holding several; with a close
    second population decomposed half as often, they raise the alert. (A cut point moved
    by one age would be a differencing pair per cell on this small population:
    ``test_a_cut_point_moved_by_one_is_a_pair``.)"""
    burst = load_instance_policy(inst).disclosure.alerts.decomposition_burst
    sex, age, _ = small_cells(inst)[0]      # P: sex = S AND age >= a; P': age >= a + 1 (1..9 fewer)
    for m in range(20, 20 + burst):
        guard.query(f"SELECT age % {m} AS y, COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age} "
                    f"GROUP BY age % {m}", user="ana")
    guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None   # one population in many tables: ordinary
    many = " UNION ALL ".join(f"SELECT {m} AS m, COUNT(*) AS n FROM residents WHERE sex = '{sex}' "
                              f"AND age >= {age} GROUP BY age % {m}" for m in range(2, 2 + burst))
    # many decompositions of one small population in one query: their cells of one value
    # (age % 2 = 1 beside age % 3 = 1) are close pairs of its own parts, checked before
    # the answer (``request_pairs.within_request``) — refused, the analyst held
    assert refused_code(guard, f"SELECT m, SUM(n) AS n FROM ({many}) GROUP BY m", "ana2") == "repeated_shape"
    assert guard_alerts.hold_of(inst, "ana2")["alert"] == "differencing"
    few = " UNION ALL ".join(f"SELECT {m} AS m, COUNT(*) AS n FROM residents WHERE sex = '{sex}' "
                             f"AND age >= {age + 1} GROUP BY age % {m}" for m in range(2, 2 + burst // 2))
    try:
        guard.query(f"SELECT m, SUM(n) AS n FROM ({few}) GROUP BY m", user="ana")
    except QueryRefused as refused:
        assert refused.code == "repeated_shape"
    guard.flush()
    # the second population pairs with the first: by its decompositions, or as a
    # differencing pair (both pause)
    assert guard_alerts.hold_of(inst, "ana")["alert"] in ("decomposition", "differencing")


def test_one_population_in_many_tables_is_not_an_alert(inst, guard):
    """What a report notebook does: the current residents by sex, age band, block, chome,
    household relationship and their crosses — 20 shapes of one population, no close
    second population: no alert, no hold."""
    keys = ["sex", "age_band", "block", "relationship", "sex, age_band", "block, sex", "block, age_band",
            "age_band, relationship", "chome_code", "age % 2", "age % 3", "age % 5", "age < 40", "age < 65",
            "age < 75", "block, relationship", "sex, relationship", "age_band, sex, block", "age % 7", "age < 20"]
    set_role(inst, "ana3", "analyst")
    for key in keys:
        guard.query(f"SELECT {key}, COUNT(*) AS n FROM residents WHERE is_current GROUP BY {key}", user="ana3")
    guard.flush()
    assert guard_alerts.hold_of(inst, "ana3") is None
    assert not [a for a in alerts_of(inst, "ana3") if a["details"]["alert"] == "decomposition"]


def test_decomposition_counter(tmp_path):
    """The rule as defined: an identity (n, key) reaching ``decomposition_burst`` distinct
    shapes within the window while a close identity (size within k - 1) has half as many,
    or reaching half while a close one has the burst, raises, in the request's
    transaction, with the hold."""
    from types import SimpleNamespace

    from sekisho.policy import Alerts

    state = SimpleNamespace(state_path=tmp_path / "state.sqlite")
    rules = Alerts(bulk_cells_per_hour=10**9, near_duplicate_burst=10**9, near_duplicate_window_s=1, differencing_window_s=1,
                   refusal_burst=10**9, refusal_window_s=60, decomposition_burst=3, decomposition_window_s=100,
                   pause_on=("decomposition",))

    def release(shape, now, identity=(200, 7)):
        found = guard_alerts.record_request(state, rules, user="u", fingerprint="f", refused=False, cells=1,
                                            populations=[(*identity, shape)], k=10, now=now, raised_by=int(now))
        return [(a["alert"], a.get("pause")) for a in found]

    assert release("a", 0) == release("a", 1) == []        # the same shape again is no new draw
    assert release("b", 2) == release("c", 3) == []        # one identity at the burst: no alert alone
    assert release("a", 4, (500, 7)) == release("b", 5, (500, 7)) == []   # far away: not close
    assert guard_alerts.hold_of(state, "u") is None
    assert release("a", 6, (205, 8)) == [("decomposition", True)]   # close, half the burst (1 of 3)
    assert guard_alerts.hold_of(state, "u") == {"user": "u", "since": 6, "alert": "decomposition", "raised_by": 6}
    assert release("b", 7, (205, 8)) == []                  # the same episode
    # shapes older than the window no longer count
    assert guard_alerts.resume(state, "u")["raised_by"] == 6
    assert release("a", 200, (300, 1)) == release("a", 201, (303, 2)) == []
    assert release("b", 202, (300, 1)) == []
    assert release("c", 203, (300, 1)) == [("decomposition", True)]   # the burst, with a close one at half


# ---- (b) a range pair differing by one person ----------------------------------------------------
def test_range_pair_differing_by_one_person_pauses_the_analyst(inst, guard):
    sex, age = truth(inst, "SELECT sex, age FROM residents WHERE age BETWEEN 50 AND 98 GROUP BY sex, age "
                           "HAVING COUNT(*) = 1 ORDER BY sex, age LIMIT 1")[0]
    first = guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age}", user="ana")
    guard.flush()
    second = guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age + 1}",
                         user="ana")
    guard.flush()
    # detection, not prevention: the pair itself was answered ...
    assert first.table.num_rows == second.table.num_rows == 1
    # ... and the analyst can ask nothing more until reviewed
    hold = guard_alerts.hold_of(inst, "ana")
    assert hold is not None and hold["alert"] == "differencing" and hold["raised_by"] == second.summary["query_id"]
    assert refused_code(guard, f"SELECT COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age + 2}",
                        "ana") == "paused_for_review"


def cell_pair_target(inst):
    """(block, age, sex) of a person alone of their age in their block, the age being
    that of k or more city-wide: the pair's populations differ by k or more."""
    return truth(inst, "WITH c AS (SELECT age, COUNT(*) AS m FROM residents GROUP BY 1) "
                       "SELECT block, r.age, any_value(sex) FROM residents r JOIN c USING (age) "
                       "WHERE m >= 20 AND r.age BETWEEN 20 AND 80 GROUP BY 1, 2 HAVING COUNT(*) = 1 "
                       "ORDER BY 1, 2 LIMIT 1")[0]


def test_a_pair_differing_in_one_cell_pauses_the_analyst(inst, guard):
    """``age >= a`` against ``> a`` by block x sex: the populations differ by everyone
    of that age city-wide, the target's cell by her alone (cell_pairs)."""
    block, age, _ = cell_pair_target(inst)
    pair = [f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age {op} {age} GROUP BY 1, 2"
            for op in (">=", ">")]
    for sql in pair:
        guard.query(sql, user="ana")
        guard.flush()
    hold = guard_alerts.hold_of(inst, "ana")
    assert hold is not None and hold["alert"] == "differencing"
    (alert,) = differencing_alerts(inst, "ana")
    assert alert["details"]["level"] == "cell" and alert["details"]["cells"] >= 1
    assert refused_code(guard, pair[0], "ana") == "paused_for_review"


def other_block(inst, block):
    (other,) = truth(inst, f"SELECT block FROM residents WHERE block <> '{block}' GROUP BY 1 ORDER BY COUNT(*) DESC "
                           "LIMIT 1")[0]
    return other


@pytest.mark.parametrize("variant", ["condition_added", "measure_added", "key_spelt_as_case", "key_added",
                                     "after_decoys"])
def test_a_pair_in_another_spelling_pauses_the_analyst(inst, guard, variant):
    """The same pair (``age >= a`` then ``> a`` by block x sex), the second spelt another
    way: a condition that changes nobody in the target's cell (another block left out), a
    measure added, the block as a CASE, a key of one value added (the keys in another
    order), or not-nested releases of the family asked in between as decoys. Releases are
    compared by family (the views) and cells by their key values, margins included;
    nested-looking candidates first."""
    block, age, _ = cell_pair_target(inst)
    other = other_block(inst, block)
    first = f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY 1, 2"
    blocks = [b for (b,) in truth(inst, "SELECT DISTINCT block FROM residents ORDER BY 1")]
    as_case = "CASE " + " ".join(f"WHEN block = '{b}' THEN '{b}'" for b in blocks) + " END"
    second = {
        "condition_added": f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age > {age} "
                           f"AND block <> '{other}' GROUP BY 1, 2",
        "measure_added": f"SELECT block, sex, COUNT(*) AS n, COUNT(DISTINCT household_id) AS households "
                         f"FROM residents WHERE age > {age} GROUP BY 1, 2",
        "key_spelt_as_case": f"SELECT {as_case} AS b, sex, COUNT(*) AS n FROM residents WHERE age > {age} "
                             "GROUP BY 1, 2",
        "key_added": f"SELECT sex, age > {age} AS older, block, COUNT(*) AS n FROM residents WHERE age > {age} "
                     "GROUP BY 1, 2, 3",
        "after_decoys": f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age > {age} GROUP BY 1, 2",
    }[variant]
    guard.query(first, user="ana")
    guard.flush()
    if variant == "after_decoys":
        # of the family, not nested with the second: each differs from it in both directions
        for shift in (-7, -5, -3, -1):   # windows sliding together: no two nested
            guard.query(f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age BETWEEN {age + shift} AND "
                        f"{age + 40 + shift} GROUP BY 1, 2", user="ana")
            guard.flush()
        assert guard_alerts.hold_of(inst, "ana") is None
    guard.query(second, user="ana")
    guard.flush()
    hold = guard_alerts.hold_of(inst, "ana")
    assert hold is not None and hold["alert"] == "differencing", variant
    assert [a["details"]["level"] for a in differencing_alerts(inst, "ana")] == ["cell"]


def test_a_family_asked_of_other_populations_does_not_pause(inst, guard):
    """What ordinary work does with one family: other blocks, other years, other ages far
    apart — populations neither of which holds the other, or cells k or more apart."""
    for sql in ["SELECT sex, age_band, COUNT(*) AS n FROM residents WHERE block = '{b}' GROUP BY 1, 2".format(b=b)
                for (b,) in truth(inst, "SELECT DISTINCT block FROM residents ORDER BY 1")[:4]] + \
               [f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= {a} GROUP BY 1, 2" for a in (20, 40, 60)] + \
               ["SELECT block, relationship, COUNT(*) AS n FROM residents WHERE is_current GROUP BY 1, 2"]:
        guard.query(sql, user="ana")
        guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None and not differencing_alerts(inst, "ana")


def test_a_pair_in_one_query_is_refused_before_it_runs(inst, guard):
    # the alert would come after the answer: two parts of one shape in one query are refused
    block, age, _ = cell_pair_target(inst)
    union = " UNION ALL ".join(f"SELECT '{op}' AS side, block, sex, COUNT(*) AS n FROM residents "
                               f"WHERE age {op} {age} GROUP BY 2, 3" for op in (">=", ">"))
    joined = (f"WITH a AS (SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY 1, 2), "
              f"b AS (SELECT block, sex, COUNT(*) AS n FROM residents WHERE age > {age} GROUP BY 1, 2) "
              "SELECT a.block, a.sex, a.n - b.n AS d FROM a JOIN b ON a.block = b.block AND a.sex = b.sex")
    other = other_block(inst, block)
    padded = (f"SELECT 'a' AS side, block, sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY 2, 3 "
              f"UNION ALL SELECT 'b', block, sex, COUNT(*) FROM residents WHERE age > {age} AND block <> '{other}' "
              "GROUP BY 2, 3")
    cut = " UNION ALL ".join(f"SELECT {c} AS cut, age < {c} AS young, COUNT(*) AS n FROM residents GROUP BY 2"
                             for c in (age, age + 1))
    for sql in (union, joined, cut):   # from the text: the parts differ only in range constants
        assert refused_code(guard, sql, "ana") == "repeated_shape"
    # spelt otherwise, the parts are checked on the store before the answer: refused, and
    # the analyst held as for a pair asked one by one
    keyed = (f"SELECT 'a' AS side, block, sex, TRUE AS t, COUNT(*) AS n FROM residents WHERE age >= {age} "
             f"GROUP BY 2, 3 UNION ALL SELECT 'b', block, sex, age > {age}, COUNT(*) FROM residents "
             f"WHERE age > {age} GROUP BY 2, 3, 4")
    for user, sql in (("ana_padded", padded), ("ana_keyed", keyed)):
        set_role(inst, user, "analyst")
        assert refused_code(guard, sql, user) == "repeated_shape"
        assert guard_alerts.hold_of(inst, user)["alert"] == "differencing"
    # one population by two keys (margins) is one query
    assert guard.query("SELECT 'block' AS key, block AS value, COUNT(*) AS n FROM residents GROUP BY 2 UNION ALL "
                       "SELECT 'sex', sex, COUNT(*) FROM residents GROUP BY 2", user="ana").table.num_rows
    # parts of other shapes, or differing in an equality (men, women), are one query as before
    assert guard.query("SELECT block, COUNT(*) AS n FROM residents GROUP BY block UNION ALL "
                       "SELECT block, COUNT(*) FROM movements GROUP BY block", user="ana").table.num_rows
    assert guard.query("SELECT block, COUNT(*) AS n FROM residents WHERE sex = '男' GROUP BY block UNION ALL "
                       "SELECT block, COUNT(*) FROM residents WHERE sex = '女' GROUP BY block",
                       user="ana").table.num_rows
    guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None


def test_a_cut_point_moved_by_one_is_a_pair(inst, guard):
    # women split at age b, then at b + 1, both parts large: they differ by those aged b
    (b,) = truth(inst, "SELECT age FROM residents WHERE sex = '女' GROUP BY age HAVING COUNT(*) BETWEEN 1 AND 9 "
                       "AND (SELECT COUNT(*) FROM residents r WHERE r.sex = '女' AND r.age < residents.age) >= 20 "
                       "AND (SELECT COUNT(*) FROM residents r WHERE r.sex = '女' AND r.age > residents.age) >= 20 "
                       "ORDER BY age LIMIT 1")[0]
    for cut in (b, b + 1):
        guard.query(f"SELECT age < {cut} AS y, COUNT(*) AS n FROM residents WHERE sex = '女' GROUP BY age < {cut}",
                    user="ana")
        guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is not None


def test_cells_k_or_more_apart_are_no_pair(inst, guard):
    # twenty years of age per block: every cell changes by k or more
    for age in (20, 40):
        guard.query(f"SELECT block, sex, COUNT(*) AS n FROM residents WHERE age >= {age} GROUP BY 1, 2",
                    user="ana")
        guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None and not differencing_alerts(inst, "ana")


# ---- (c) the hold --------------------------------------------------------------------------------
def pause_by_differencing(guard, user):
    for age in (70, 71):   # a range pair: the populations differ by fewer than k
        guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '女' AND age >= {age}", user=user)
        guard.flush()


def resume_cli(inst, name, monkeypatch, *, euid=None):
    from sekisho.cli.users import users

    monkeypatch.delenv("SUDO_USER", raising=False)
    if euid is not None:
        monkeypatch.setattr(os, "geteuid", lambda: euid)
    return CliRunner().invoke(users, ["resume", name, "--home", str(inst.home)])


def test_hold_refuses_only_that_analyst_until_an_admin_resumes(inst, guard, monkeypatch):
    sql = "SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex"
    pause_by_differencing(guard, "ana")
    hold = guard_alerts.hold_of(inst, "ana")
    assert hold["alert"] == "differencing"
    alert = [a for a in alerts_of(inst, "ana") if a["details"]["alert"] == "differencing"][0]
    assert alert["details"]["pause"] is True and alert["details"]["raised_by"] == hold["raised_by"]

    assert refused_code(guard, sql, "ana") == "paused_for_review"
    refusal = list(inst.audit.entries(type="query.refused", user="ana"))[-1]
    assert refusal["details"]["code"] == "paused_for_review" and refusal["outcome"] == "refused"
    assert "管理者" in refusal["details"]["reason"]
    # reading no data stays open; the other analyst is not affected
    assert "residents" in guard.views("ana") and guard.budget("ana")["period"]
    assert guard.describe(sql, user="ana").names == ["sex", "n"]
    assert guard.query(sql, user="ana2").table.num_rows == 2
    # the hold is in state.sqlite: a restarted guard still refuses
    again = Guard(inst)
    assert refused_code(again, sql, "ana") == "paused_for_review"
    again.close()

    # an analyst may not resume anyone (themselves included)
    set_role(inst, os_user_name(), "analyst")
    denied = resume_cli(inst, "ana", monkeypatch, euid=1000)
    assert denied.exit_code != 0 and guard_alerts.hold_of(inst, "ana") is not None
    # an admin (or root) may
    set_role(inst, os_user_name(), "admin")
    done = resume_cli(inst, "ana", monkeypatch, euid=1000)
    assert done.exit_code == 0, done.output
    assert guard_alerts.hold_of(inst, "ana") is None
    resumed = list(inst.audit.entries(type="guard.resume"))[-1]
    assert resumed["user"] == os_user_name()
    assert {k: resumed["details"][k] for k in ("name", "resumed", "alert", "raised_by")} == {
        "name": "ana", "resumed": "ana", "alert": "differencing", "raised_by": hold["raised_by"]}
    assert guard.query(sql, user="ana").table.num_rows == 2
    assert inst.audit.verify().ok
    # the reviewed episode is closed: the same attack again pauses again
    pause_by_differencing(guard, "ana")
    assert guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"
    assert "not on hold" in resume_cli(inst, "ana2", monkeypatch).output


def test_no_hold_without_pause_on(inst):
    """Alerts that are not in ``pause_on`` are only audited (the policy decides)."""
    policy = load_instance_policy(inst)
    policy = dataclasses.replace(policy, disclosure=dataclasses.replace(
        policy.disclosure, alerts=dataclasses.replace(policy.disclosure.alerts, pause_on=())))
    g = Guard(inst, policy=policy)
    pause_by_differencing(g, "ana")
    assert [a["details"]["alert"] for a in alerts_of(inst, "ana")] == ["differencing"]
    assert "pause" not in alerts_of(inst, "ana")[0]["details"]
    assert guard_alerts.hold_of(inst, "ana") is None
    g.close()


def test_policy_keys(tmp_path, inst):
    """``pause_on`` names known alerts (default: none); the reports role is never held."""
    import yaml

    text = inst.policy_path.read_text(encoding="utf-8")
    policy = load_policy(inst.policy_path)
    assert policy.disclosure.alerts.pause_on == ("differencing", "decomposition", "upload_differencing",
                                                 "upload_decomposition")
    assert policy.disclosure.alerts.upload_decomposition_min_variance == 8
    assert (policy.disclosure.alerts.decomposition_burst, policy.disclosure.alerts.decomposition_window_s) == (12, 3600)
    assert policy.roles["analyst"].alert_holds and not policy.roles["reports"].alert_holds
    doc = yaml.safe_load(text)
    for value, problem in ((["differencing", "typo"], r"pause_on\[1\]"), ("differencing", "must be a list")):
        doc["disclosure"]["alerts"]["pause_on"] = value
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        with pytest.raises(PolicyError, match=problem):
            load_policy(tmp_path / "p.yaml")
    for key in ("pause_on", "decomposition_burst", "decomposition_window_s", "upload_decomposition_min_variance"):
        del doc["disclosure"]["alerts"][key]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    defaults = load_policy(tmp_path / "p.yaml").disclosure.alerts
    assert defaults.pause_on == () and defaults.upload_decomposition_min_variance == 8


def test_reports_role_is_not_held(inst, guard):
    pause_by_differencing(guard, "rep")
    assert [a["details"]["alert"] for a in alerts_of(inst, "rep")] == ["differencing"]
    assert guard_alerts.hold_of(inst, "rep") is None


# ---- (d) normal use does not pause ---------------------------------------------------------------
def test_ordinary_analysis_does_not_pause(inst, guard):
    """30 ordinary queries: city-wide tables, then a few populations each looked at under
    a few tables (one of them under 7)."""
    shapes = ["", "sex", "age_band", "relationship", "sex, age_band"]
    sqls = [f"SELECT {k}, COUNT(*) AS n FROM residents GROUP BY {k}" for k in ("sex", "age_band", "block")]
    for where in ("age >= 65", "age < 15", "block IN ('灘', '東部')", "age BETWEEN 20 AND 39"):
        sqls += [f"SELECT {k + ', ' if k else ''}COUNT(*) AS n FROM residents WHERE {where}"
                 f"{' GROUP BY ' + k if k else ''}" for k in shapes]
    sqls += [f"SELECT {k}, COUNT(*) AS n FROM residents WHERE block = '飾磨' GROUP BY {k}"
             for k in ("sex", "age_band", "relationship", "chome_code", "sex, age_band", "sex, relationship",
                       "age_band, relationship")]
    assert len(sqls) == 30
    for sql in sqls:
        guard.query(sql, user="ana")
    guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None
    assert not [a for a in alerts_of(inst, "ana") if a["details"]["alert"] in ("differencing", "decomposition")]


# ---- (e) differencing is verified on the store ---------------------------------------------------
def differencing_alerts(inst, user):
    return [a for a in alerts_of(inst, user) if a["details"]["alert"] == "differencing"]


def bookkeeping_failures(inst, user):
    return [e for e in inst.audit.entries(type="alert.bookkeeping_failed") if e["user"] == user]


def block_sizes(inst) -> dict[str, int]:
    return dict(truth(inst, "SELECT block, COUNT(*) FROM residents GROUP BY block"))


def count_in(block: str) -> str:
    return f"SELECT COUNT(*) AS n FROM residents WHERE block = '{block}'"


def test_unrelated_populations_of_nearly_equal_size_do_not_pause(inst, guard):
    """Every block, from the smallest to the largest, back to back: neighbours in size are
    often 1..k-1 apart (the size rule alone paused here), but share nobody."""
    k = load_instance_policy(inst).disclosure.k
    sizes = block_sizes(inst)
    blocks = sorted(sizes, key=lambda b: (sizes[b], b))
    assert sum(1 <= sizes[b] - sizes[a] < k for a, b in zip(blocks, blocks[1:])) >= 3
    for block in blocks:
        assert guard.query(count_in(block), user="ana").table.num_rows == 1
        guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None
    assert differencing_alerts(inst, "ana") == [] and bookkeeping_failures(inst, "ana") == []


def shifted_ranges(inst, k):
    """``sex = S AND age BETWEEN a AND b`` and the range shifted by one year: sizes 1..k-1
    apart, contributors k+2 apart (the ages a and b+1)."""
    counts = {(s, a): n for s, a, n in truth(inst, "SELECT sex, age, COUNT(*) FROM residents GROUP BY 1, 2")}
    for (sex, a), low in sorted(counts.items()):
        for width in range(8, 16):
            high = counts.get((sex, a + width + 1), 0)
            if 20 <= a <= 60 and low + high == k + 2 and 1 <= abs(low - high) < k:
                return sex, a, a + width
    raise AssertionError("no shifted range pair in the fixture")


def test_overlapping_populations_k_plus_2_apart_do_not_alert(inst, guard):
    k = load_instance_policy(inst).disclosure.k
    sex, a, b = shifted_ranges(inst, k)
    where = [f"sex = '{sex}' AND age BETWEEN {a} AND {b}", f"sex = '{sex}' AND age BETWEEN {a + 1} AND {b + 1}"]
    sizes = [truth(inst, f"SELECT COUNT(*) FROM residents WHERE {w}")[0][0] for w in where]
    assert 1 <= abs(sizes[0] - sizes[1]) < k   # close in size ...
    a_only, b_only = (f"SELECT person_id FROM residents WHERE {w} EXCEPT SELECT person_id FROM residents "
                      f"WHERE {v}" for w, v in (where, where[::-1]))
    assert truth(inst, f"SELECT COUNT(*) FROM (({a_only}) UNION ALL ({b_only}))")[0][0] == k + 2   # ... but k+2 apart
    for w in where:
        assert guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE {w}", user="ana").summary[
            "conditions_left_out"] == []
        guard.flush()
    assert guard_alerts.hold_of(inst, "ana") is None
    assert differencing_alerts(inst, "ana") == [] and bookkeeping_failures(inst, "ana") == []


def test_differencing_across_a_snapshot_switch(inst, guard):
    """Pairs across an upload are compared each on its own snapshot (the old one opened
    read-only through the store): the range pair still pauses, two unrelated blocks do
    not; a pair whose old snapshot was pruned is audited as a bookkeeping failure."""
    from guard_fixtures import add_snapshot, band

    from sekisho.store import Store

    k = load_instance_policy(inst).disclosure.k
    sex, age = truth(inst, "SELECT sex, age FROM residents WHERE age BETWEEN 50 AND 98 GROUP BY sex, age "
                           "HAVING COUNT(*) = 1 ORDER BY sex, age LIMIT 1")[0]
    sizes = block_sizes(inst)
    x, y = next((a, b) for a in sorted(sizes) for b in sorted(sizes) if 1 <= sizes[a] - sizes[b] < k)
    other = next(b for b in sorted(sizes) if b not in (x, y))
    store = Store(inst)
    first = store.current_id()
    guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age}", user="ana")
    guard.query(count_in(x), user="ana2")
    guard.query(count_in(x), user="rep")
    guard.flush()
    # an upload: one newcomer, in neither block nor the range pair's population
    add_snapshot(inst, [("p_new", "h_new", "男" if sex == "女" else "女", 30, band(30), "子", "2820140000", other,
                         True, 5)])
    assert store.current_id() != first
    guard.query(f"SELECT COUNT(*) AS n FROM residents WHERE sex = '{sex}' AND age >= {age + 1}", user="ana")
    guard.query(count_in(y), user="ana2")
    guard.flush()
    assert guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"
    assert guard_alerts.hold_of(inst, "ana2") is None and differencing_alerts(inst, "ana2") == []
    assert bookkeeping_failures(inst, "ana") == bookkeeping_failures(inst, "ana2") == []
    # the first snapshot is pruned: its population can no longer be compared
    assert store.prune(keep=1) == [first]
    guard.query(count_in(y), user="rep")
    guard.flush()
    failed = bookkeeping_failures(inst, "rep")
    assert len(failed) == 1 and failed[0]["details"]["check"] == "differencing"
    assert guard.recorder.checks._older is None   # no connection holds the pruned file open
    assert differencing_alerts(inst, "rep") == []
    assert guard.query(count_in(other), user="rep").table.num_rows == 1   # the guard goes on


def test_close_pairs_are_returned_for_verification_and_confirmed_once_per_episode(tmp_path):
    """``record_request`` returns the closest pairs (sizes 1..k-1 apart, at most
    MAX_PAIRS, each pair of definitions once) and raises no differencing itself;
    ``confirm_differencing`` raises it (with the hold) once per episode."""
    from types import SimpleNamespace

    from sekisho.policy import Alerts

    state = SimpleNamespace(state_path=tmp_path / "state.sqlite")
    rules = Alerts(bulk_cells_per_hour=10**9, near_duplicate_burst=10**9, near_duplicate_window_s=100, differencing_window_s=100,
                   refusal_burst=10**9, refusal_window_s=60, pause_on=("differencing",))

    def release(n, sql, now, snapshot="s1"):
        return guard_alerts.record_request(state, rules, user="u", fingerprint="f", refused=False, cells=1,
                                           populations=[(n, 0, sql, snapshot, sql)], k=10, now=now, raised_by=now)

    assert release(200, "A", 0) == [] and release(200, "A", 1).pairs == []   # the same size is no pair
    for i, n in enumerate((195, 205, 190, 203, 203)):
        release(n, f"B{i}", 2 + i)
    statements: list[str] = []
    alert_state.connect(state).set_trace_callback(statements.append)
    found = release(201, "C", 10)
    alert_state.connect(state).set_trace_callback(None)
    # still one transaction, as many statements as without a definition (the candidates
    # replace the close count): 7 as in test_guard_alerts, plus 3 for the decomposition,
    # plus 2 for upload_differencing (the population kept for the window, its candidates)
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert sum(s.startswith("BEGIN") for s in statements) == 1
    assert len([s for s in statements if not s.startswith("DELETE")]) == 12
    assert found.upload_pairs == []   # one snapshot: no pair across an upload
    assert found == [] and len(found.pairs) == guard_alerts.MAX_PAIRS
    assert [(p.gap, p.old.sql) for p in found.pairs] == [(1, "A"), (2, "B4"), (2, "B3"), (4, "B1")]
    assert {p.new.sql for p in found.pairs} == {"C"} and found.pairs[0].new.snapshot == "s1"
    assert guard_alerts.hold_of(state, "u") is None
    confirmed = guard_alerts.confirm_differencing(state, rules, user="u", fingerprint="f", pairs=found.pairs[:1],
                                                  now=11, raised_by=10)
    assert confirmed == [{"alert": "differencing", "window_s": 100, "fingerprint": "f", "pause": True}]
    assert guard_alerts.hold_of(state, "u")["raised_by"] == 10
    again = release(202, "D", 12)
    assert guard_alerts.confirm_differencing(state, rules, user="u", fingerprint="f", pairs=again.pairs[:1],
                                             now=13) == []   # the same episode
    # outside the window (and after a resume) a verified pair opens a new episode
    guard_alerts.resume(state, "u")
    release(300, "E", 500)
    late = release(305, "F", 501)
    assert [p.old.sql for p in late.pairs] == ["E"]
    assert [a["alert"] for a in guard_alerts.confirm_differencing(
        state, rules, user="u", fingerprint="f", pairs=late.pairs, now=502)] == ["differencing"]


def test_a_state_file_without_population_definitions_is_upgraded(tmp_path):
    import sqlite3
    from types import SimpleNamespace

    from sekisho.policy import Alerts

    path = tmp_path / "state.sqlite"
    con = sqlite3.connect(path)
    con.execute("""CREATE TABLE guard_populations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        population INTEGER NOT NULL, fingerprint TEXT NOT NULL)""")
    con.execute("INSERT INTO guard_populations(user, ts, population, fingerprint) VALUES ('u', 0, 100, 'f')")
    con.commit()
    con.close()
    rules = Alerts(bulk_cells_per_hour=10**9, near_duplicate_burst=10**9, near_duplicate_window_s=100, differencing_window_s=100,
                   refusal_burst=10**9, refusal_window_s=60)
    found = guard_alerts.record_request(SimpleNamespace(state_path=path), rules, user="u", fingerprint="f",
                                        refused=False, cells=1, populations=[(101, 0, "s", "snap", "SQL")], k=10,
                                        now=1)
    assert found == [] and found.pairs == []   # an old row without a definition is no candidate


def test_upload_pairs_are_counted_per_user_and_raise_once_at_the_burst(tmp_path):
    """``record_request`` returns populations on *other* snapshots within k - 1 (the same
    row SQL first) as ``upload_pairs``; ``confirm_upload_differencing`` raises the alert
    (with the hold) when the user's verified pairs reach the burst, once; a resume forgets
    the pairs, not the populations."""
    from types import SimpleNamespace

    from sekisho.policy import Alerts

    state = SimpleNamespace(state_path=tmp_path / "state.sqlite")
    rules = Alerts(bulk_cells_per_hour=10**9, near_duplicate_burst=10**9, near_duplicate_window_s=100, differencing_window_s=100,
                   refusal_burst=10**9, refusal_window_s=60, upload_differencing_burst=3,
                   upload_differencing_window_s=10**6, pause_on=("upload_differencing",))

    def release(n, sql, now, snapshot):
        return guard_alerts.record_request(state, rules, user="u", fingerprint="f", refused=False, cells=1,
                                           populations=[(n, 0, sql, snapshot, sql)], k=10, now=now, raised_by=now)

    for i in range(4):
        assert release(80 + i, f"Q{i}", i, "s1").upload_pairs == []
    release(500, "far", 4, "s1")
    # after the upload (ts far outside the differencing window): the same SQL is the first candidate
    found = [release(81 + i, f"Q{i}", 1000 + i, "s2") for i in range(4)]
    assert [f.upload_pairs[0].old.sql for f in found] == ["Q0", "Q1", "Q2", "Q3"]
    assert all(p.old.snapshot == "s1" and p.new.snapshot == "s2" for f in found for p in f.upload_pairs)
    assert all(p.old.sql != "far" for f in found for p in f.upload_pairs)   # 419 apart: no pair
    raised = [guard_alerts.confirm_upload_differencing(state, rules, user="u", fingerprint="f",
                                                       pairs=f.upload_pairs[:1], now=1010 + i, raised_by=i)
              for i, f in enumerate(found)]
    assert [len(r) for r in raised] == [0, 0, 1, 0]   # at the burst, once
    assert raised[2][0]["alert"] == "upload_differencing" and raised[2][0]["pause"] is True
    assert guard_alerts.hold_of(state, "u")["alert"] == "upload_differencing"
    # the same pair confirmed again counts once
    assert guard_alerts.confirm_upload_differencing(state, rules, user="u", fingerprint="f",
                                                    pairs=found[0].upload_pairs[:1], now=1020) == []
    guard_alerts.resume(state, "u")
    assert guard_alerts.hold_of(state, "u") is None
    again = release(84, "Q3", 1030, "s3")   # a third snapshot: the populations were kept
    assert {p.old.snapshot for p in again.upload_pairs} == {"s1", "s2"}
    assert guard_alerts.confirm_upload_differencing(state, rules, user="u", fingerprint="f",
                                                    pairs=again.upload_pairs[:2], now=1031) == []   # 2 < 3


def test_a_pair_paced_past_the_near_duplicate_window_is_still_a_pair(tmp_path):
    # red team: every ``age <= a`` side first, a wait longer than the near-duplicate window,
    # then the ``a - 1`` sides — the policy's differencing window (a week) still pairs them
    from pathlib import Path
    from types import SimpleNamespace

    from sekisho.policy import load_policy

    rules = load_policy(Path(__file__).resolve().parents[1] / "policies" / "himeji.yaml").disclosure.alerts
    assert rules.differencing_window_s >= 7 * 86400 > rules.near_duplicate_window_s
    state = SimpleNamespace(state_path=tmp_path / "state.sqlite")

    def release(n, sql, now):
        return guard_alerts.record_request(state, rules, user="u", fingerprint=sql, refused=False, cells=1,
                                           populations=[(n, 0, sql, "s1", sql)], k=10, now=now, raised_by=now)

    release(120, "age <= 40", 0)
    for day in (0.5, 3, 6.5):   # hours and days later
        late = release(119, f"age <= 39 ({day})", day * 86400)
        assert [p.old.sql for p in late.pairs][:1] == ["age <= 40"], day
    # past the window the first half is forgotten
    assert all(p.old.sql != "age <= 40" for p in release(119, "age <= 39 (8)", 8 * 86400).pairs)


def _release_cells(n: list[int]) -> dict:
    import numpy as np

    from sekisho.guard import hidden
    return {hidden.group_key(0): ["東部", "西部"], hidden.group_key(1): ["男", "女"],
            hidden.CONTRIBUTORS: np.array(n), hidden.CELL_KEY: np.array([7, 9]), hidden.ONE_ROW_EACH: True}


def _request(inst, releases, differs, *, user="ana"):
    """One request's bookkeeping of cell releases (``cell_checks.check_releases``) on the
    instance's current snapshot, with the store check's answer given by
    ``differs(pair)`` (the sketches, ``cell_sketches``, are counted on the store); returns
    the alerts it raised."""
    from sekisho.guard import cell_checks
    from sekisho.store import Store
    snapshot = Store(inst).current_id()
    original = cell_checks.differing
    cell_checks.differing = lambda cur, pair, k: differs(pair)
    guard = Guard(inst)
    try:
        found, failure = cell_checks.check_releases(
            inst, load_instance_policy(inst).disclosure,
            [(snapshot, sql, 2, _release_cells(n), None) for sql, n in releases], user=user, fingerprint="f",
            cursor=guard.recorder.checks.cursor, current=snapshot, raised_by=None, pause=True)
    finally:
        cell_checks.differing = original
        guard.close()
    assert failure is None
    return found


@pytest.fixture()
def unsketched(monkeypatch):
    """No sketches counted (``cell_sketches.MAX_SKETCHES`` 0: a request with more
    releases to sketch than its budget, after a restart): every candidate needs a
    store check."""
    from sekisho.guard import cell_sketches
    monkeypatch.setattr(cell_sketches, "MAX_SKETCHES", 0)
    cell_sketches.clear()
    yield
    cell_sketches.clear()


def _row(condition: str) -> str:
    return f"SELECT block AS __g0, sex AS __g1, person_id AS __pid FROM residents WHERE {condition}"


def _pair_with_decoys_between(inst):
    """The first half of ``age >= 40`` / ``> 40`` and ``MAX_CHECKS`` decoys asked: releases
    of the family, close and moved one way, each not nested on the store. Returns the two
    halves, the store check's answer (``differs``: only the pair differs) and the pairs it
    was asked for (``checked``)."""
    from sekisho.guard import cell_pairs
    first, second = _row("age >= 40"), _row("age > 40")
    decoys = [_row(f"age > {38 - i} AND age NOT BETWEEN {60 + 3 * i} AND {61 + 3 * i}")
              for i in range(cell_pairs.MAX_CHECKS)]
    checked = []

    def differs(pair):
        checked.append({pair.new_sql, pair.old_sql})
        return 1 if {pair.new_sql, pair.old_sql} == {first, second} else 0

    assert _request(inst, [(first, [30, 40])], differs) == []
    for i, decoy in enumerate(decoys):
        assert _request(inst, [(decoy, [32 + i, 42 + i])], differs) == []
    return first, second, differs, checked


def test_decoys_that_take_a_requests_checks_only_delay_the_pair(inst, unsketched):
    """The pair ``age >= a`` / ``> a`` (one person apart in one cell) with ``MAX_CHECKS``
    decoys asked in between: releases of the family, close and moved one way (so ranked
    before the older half), each not nested on the store. The second half's checks go to
    the decoys; the pair left over waits and the user's next request checks it first:
    the analyst is held one request later, not never (a first version dropped it)."""
    from sekisho.guard import cell_pairs
    first, second, differs, checked = _pair_with_decoys_between(inst)
    checked.clear()
    assert _request(inst, [(second, [29, 40])], differs) == []
    assert {first, second} not in checked and len(checked) == cell_pairs.MAX_CHECKS   # the decoys took them
    assert guard_alerts.hold_of(inst, "ana") is None
    (alert,) = _request(inst, [(_row("age >= 70"), [300, 400])], differs)   # far: no new candidate
    assert checked[cell_pairs.MAX_CHECKS] == {first, second}
    assert alert["alert"] == "differencing" and alert["level"] == "cell"
    assert guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"


def test_more_pairs_waiting_than_the_checks_can_follow_raise_the_alert(inst, unsketched):
    """An analyst whose requests leave more candidate pairs unchecked than later requests
    can check (``MAX_PENDING`` waiting) is held (``unchecked``): decoys cannot outrun the
    checks. A short run of related releases is not (its pairs are all checked)."""
    from sekisho.guard import cell_checks
    never = lambda pair: 0   # noqa: E731 - the store: no pair differs
    for i in range(5):   # five related releases: at most 4 candidates each, drained as they come
        assert _request(inst, [(_row(f"age >= {40 + i}"), [30 - i, 40 - i])], never, user="bea") == []
    assert guard_alerts.hold_of(inst, "bea") is None
    raised = []
    for i in range(60):   # each release close to every earlier one
        raised += _request(inst, [(_row(f"age >= {20 + i}"), [90 - i, 95 - i])], never)
        if raised:
            break
    assert [a["level"] for a in raised] == ["unchecked"] and raised[0]["pending"] > cell_checks.MAX_PENDING
    assert guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"


def test_decoys_not_nested_on_the_store_are_dropped_by_their_sketches(inst):
    """With sketches counted (``cell_sketches``), the decoys of the test above — not
    nested with either half — need no store check: the pair is checked, and the analyst
    held, at the second half's own request."""
    from sekisho.guard import cell_sketches
    cell_sketches.clear()
    first, second, differs, checked = _pair_with_decoys_between(inst)
    (alert,) = _request(inst, [(second, [29, 40])], differs)
    assert checked == [{first, second}]   # the only store check
    assert alert["level"] == "cell" and guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"


def test_a_sweep_of_sets_none_nested_is_neither_checked_nor_held(inst):
    """Sixty age windows slid by one year (each close to every earlier one in its cells,
    none holding another's persons): the sketches drop every candidate — no store check,
    nothing waits, no hold (unsketched, they raised ``unchecked``: the test above). A
    nested pair asked after them is still checked and held."""
    from sekisho.guard import cell_sketches
    from sekisho.guard.alert_state import state_of
    cell_sketches.clear()
    checked = []

    def differs(pair):
        checked.append(pair)
        return 1

    for i in range(60):
        assert _request(inst, [(_row(f"age BETWEEN {10 + i} AND {20 + i}"), [90 - i, 95 - i])], differs) == []
    assert checked == [] and guard_alerts.hold_of(inst, "ana") is None
    assert state_of(inst).con.execute("SELECT COUNT(*) FROM guard_cell_pending").fetchone() == (0,)
    (alert,) = _request(inst, [(_row("age BETWEEN 69 AND 78"), [30, 36])], differs)   # inside the last two
    assert {pair.old_sql for pair in checked} == {_row("age BETWEEN 68 AND 78"), _row("age BETWEEN 69 AND 79")}
    assert guard_alerts.hold_of(inst, "ana")["alert"] == "differencing"


def test_within_an_episode_nothing_more_is_checked_and_after_it_the_alert_comes_again(inst):
    """Once a confirmed pair opened the user's episode, later candidates take no store
    check (none could raise the alert again: an attack went on at two scans a pair);
    once the window has passed, a pair is checked and alerted again."""
    from sekisho.guard.alert_state import state_of
    checked = []

    def differs(pair):
        checked.append(pair)
        return 1

    assert _request(inst, [(_row("age >= 40"), [30, 40])], differs) == []
    (alert,) = _request(inst, [(_row("age > 40"), [29, 40])], differs)
    assert alert["level"] == "cell" and len(checked) == 1
    assert _request(inst, [(_row("age > 41"), [28, 39])], differs) == [] and len(checked) == 1
    window = load_instance_policy(inst).disclosure.alerts.differencing_window_s
    con = state_of(inst).con
    for table in ("guard_cell_pairs", "guard_cell_releases"):
        con.execute(f"UPDATE {table} SET ts = ts - ?", (window + 10,))   # the window has passed
    assert _request(inst, [(_row("age >= 50"), [20, 30])], differs) == []
    (again,) = _request(inst, [(_row("age > 50"), [19, 30])], differs)
    assert again["level"] == "cell" and len(checked) == 2


def test_sketches_never_drop_a_nested_pair(inst):
    """``cell_sketches``: the counts per bucket on the store are the persons' (checked
    against Python), and a pair whose persons are one within the other always passes —
    over random conditions on the test city; pairs that each have persons the other has
    not are (nearly all) dropped."""
    import random

    import numpy as np

    from sekisho.guard import cell_sketches
    from sekisho.store import Store
    snapshot = Store(inst).current_id()
    rng = random.Random(5)
    guard = Guard(inst)
    try:
        with guard.recorder.checks.cursor(snapshot) as cur:
            persons = dict(cur.execute("SELECT person_id, age FROM residents").fetchall())
            hashes = dict(cur.execute("SELECT person_id, hash(person_id) % 2048 FROM residents").fetchall())
            nested = dropped = apart = 0
            for _ in range(40):
                lo, hi = sorted(rng.sample(range(0, 100), 2))
                inner_lo, inner_hi = lo + rng.randrange(0, 3), hi - rng.randrange(0, 3)
                other = rng.randrange(0, 100)
                sqls = [_row(f"age BETWEEN {lo} AND {hi}"), _row(f"age BETWEEN {inner_lo} AND {inner_hi}"),
                        _row(f"age BETWEEN {other} AND {other + 5}")]
                got = cell_sketches.count(cur, snapshot, sqls)
                for sql, (a, b) in zip(sqls, [(lo, hi), (inner_lo, inner_hi), (other, other + 5)]):
                    expected = np.zeros(cell_sketches.BUCKETS, dtype=np.int64)
                    for pid, age in persons.items():
                        if age is not None and a <= age <= b:
                            expected[hashes[pid]] += 1
                    assert (got[sql] == expected).all()
                assert cell_sketches.can_be_nested(got[sqls[0]], got[sqls[1]])
                assert cell_sketches.can_be_nested(got[sqls[1]], got[sqls[0]])
                nested += 1
                outer = {p for p, age in persons.items() if age is not None and lo <= age <= hi}
                third = {p for p, age in persons.items() if age is not None and other <= age <= other + 5}
                if outer - third and third - outer:
                    apart += 1
                    dropped += not cell_sketches.can_be_nested(got[sqls[0]], got[sqls[2]])
    finally:
        guard.close()
    assert nested == 40 and apart >= 20 and dropped >= 0.9 * apart, (apart, dropped)


def test_margins_match_a_table_with_a_key_added_or_reordered():
    """``cell_pairs.digest`` records a release by its margins, cells matched by key values
    as a multiset: block x sex x (one value) and sex x block are block x sex again, and a
    cell one person apart is a close pair naming the keys each side is compared by."""
    import numpy as np

    from sekisho.guard import cell_pairs, hidden

    assert cell_pairs.margins(1) == [(0,)]
    assert cell_pairs.margins(3) == [(0, 1, 2), (1, 2), (0, 2), (2,), (0, 1), (1,), (0,), ]
    assert cell_pairs.margins(4)[0] == (0, 1, 2, 3) and len(cell_pairs.margins(4)) == 5

    def cells(keys, n, ck):
        out = {hidden.group_key(j): column for j, column in enumerate(keys)}
        out[hidden.CONTRIBUTORS], out[hidden.CELL_KEY] = np.array(n), np.array(ck)
        out[hidden.ONE_ROW_EACH] = True
        return out

    first = cell_pairs.digest(cells([["東部", "東部", "西部"], ["男", "女", "女"]], [30, 12, 40], [5, 6, 7]), 2, 10)
    added = cell_pairs.digest(cells([["女", "女", "男"], [True, True, True], ["東部", "西部", "東部"]],
                                    [11, 40, 30], [9, 7, 5]), 3, 10)
    close, one_way, where = cell_pairs.close_cells(added, first, 10, 3, 2)
    # (女, 東部): 11 against 12, and so the margins 女 and 東部
    assert close == 3 and one_way and where == ((0, 2), (0, 1))
    far = cell_pairs.digest(cells([["東部"], ["女"]], [80], [1]), 2, 10)   # its margins far too
    assert cell_pairs.close_cells(far, first, 10, 2, 2)[0] == 0
