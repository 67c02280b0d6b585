"""Resource governance per query (issue 17, ``sekisho.guard.limits``): the cell estimate
refuses before execution, a statement past the deadline is interrupted (one refusal
code, audited, an alert, DP budget debited first) and the guard answers the next query,
every DuckDB connection carries the configured memory limit and threads, and queries
are admitted in fair order."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from guard_fixtures import make_instance
from sekisho.guard import Guard, QueryRefused
from sekisho.guard import protection
from sekisho.guard.limits import Admission, Limits, LimitsError, estimate_cells
from sekisho.guard.planning import make_plan

SLOW = "SELECT COUNT(*) AS __n FROM range(100000000000) AS a(i) WHERE i * i % 7 = 3"   # hours, if let run


def configured(inst, **guard):
    path = inst.home / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["guard"] = guard
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    from sekisho.instance import Instance
    return Instance.open(inst.home)


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return make_instance(tmp_path_factory.mktemp("limits") / "inst", persons=3000, seed=17)


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("section, message", [
    ({"memory_limt": "1GB"}, "guard.memory_limt: unknown key"),
    ({"memory_limit": "lots"}, "guard.memory_limit: 'lots' is not a size"),
    ({"post_memory_limit": 64}, "guard.post_memory_limit: 64 is not a size"),
    ({"threads": 0}, "guard.threads: 0 must be a positive integer"),
    ({"threads": 1.5}, "guard.threads: 1.5 must be a positive integer"),
    ({"query_seconds": "60"}, "guard.query_seconds: '60' must be a positive number"),
    ({"max_cells": True}, "guard.max_cells: True must be a positive integer"),
])
def test_bad_limits_name_their_key(section, message):
    with pytest.raises(LimitsError, match=message.replace(".", r"\.")):
        Limits.from_config({"guard": section})


def test_limits_default_and_read_from_config():
    assert Limits.from_config({}) == Limits()
    assert Limits.from_config({"guard": {"query_seconds": 5, "memory_limit": "512MB"}}).query_seconds == 5.0


def test_every_guard_connection_has_the_memory_limit_and_threads(inst):
    inst = configured(inst, memory_limit="300MB", threads=1, post_memory_limit="64MB")
    g = Guard(inst)
    try:
        g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana")
        snap = g.snapshots.current()
        # the data connections have memory_limit; post-processing (protected tables only) the small one
        for con, limit in ((snap.con, ("286.1MIB", "300.0MB", "286MIB", "300MB")),
                           (snap.cursor(), ("286.1MIB", "300.0MB", "286MIB", "300MB")),
                           (g.post.connection(), ("61.0MIB", "64.0MB", "61MIB", "64MB"))):
            memory, threads = con.execute("SELECT current_setting('memory_limit'), "
                                          "current_setting('threads')").fetchone()
            assert threads == 1
            assert memory.replace(" ", "").upper() in limit, memory
    finally:
        g.close()
        configured(inst)


# ---- cells estimated before execution -----------------------------------------------------------
def test_the_estimate_uses_public_domains_bounds_and_case_branches(inst):
    g = Guard(inst)
    try:
        snap = g.snapshots.current()
        catalog = g._catalog("analyst", snap)
        limits = Limits()

        def estimate(sql):
            return estimate_cells(make_plan(sql, catalog), catalog, limits)

        sex = estimate("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex")
        block_sex = estimate("SELECT block, sex, COUNT(*) AS n FROM residents GROUP BY block, sex")
        assert 2 <= sex <= 4 and block_sex >= 5 * sex
        assert estimate("SELECT CASE WHEN age >= 65 THEN 'old' ELSE 'young' END AS g, COUNT(*) AS n "
                        "FROM residents GROUP BY 1") == 2
        assert estimate("SELECT COUNT(*) AS n FROM residents") == 1
    finally:
        g.close()


def test_a_query_over_the_cell_cap_is_refused_before_it_runs(inst, monkeypatch):
    inst = configured(inst, max_cells=50)
    g = Guard(inst)
    ran = []
    monkeypatch.setattr(protection, "fetch", lambda *a, **k: ran.append(a) or pytest.fail("executed"))
    try:
        with pytest.raises(QueryRefused) as info:
            g.query("SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY 1, 2, 3", user="ana")
        assert info.value.code == "result_too_large"
        assert "limit 50" in info.value.part and "estimate" in info.value.part
        assert not ran
        refused = list(inst.audit.entries(type="query.refused"))[-1]
        assert refused["details"]["code"] == "result_too_large"
    finally:
        g.close()
        configured(inst)


# ---- time limit --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["threshold", "dp"])
def test_a_query_past_its_deadline_is_interrupted_audited_and_the_guard_goes_on(inst, monkeypatch, mode):
    inst = configured(inst, query_seconds=1)
    g = Guard(inst)
    try:
        g.query("SELECT COUNT(*) AS n FROM residents", user="ana")   # snapshot open, caches warm
        spent = g.budget("ana")["spent"]
        with monkeypatch.context() as patch:
            original = protection.fetch
            patch.setattr(protection, "fetch", lambda snap, sql, **kw: original(snap, SLOW, **kw))
            started = time.monotonic()
            with pytest.raises(QueryRefused) as info:
                g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana", mode=mode,
                        epsilon=0.1 if mode == "dp" else None)
            assert info.value.code == "resource_limit"
            assert time.monotonic() - started < 30    # interrupted, not run for hours
        g.flush()
        refused = list(inst.audit.entries(type="query.refused"))[-1]
        assert refused["details"]["code"] == "resource_limit"
        alert = list(inst.audit.entries(type="alert"))[-1]
        assert alert["details"]["alert"] == "resource_limit" and alert["details"]["raised_by"] == refused["seq"]
        if mode == "dp":
            assert g.budget("ana")["spent"] == pytest.approx(spent + 0.1)   # debited before execution
        # the guard still answers
        assert g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana").table.num_rows == 2
    finally:
        g.close()
        configured(inst)


# ---- fair share ---------------------------------------------------------------------------------
def test_a_burst_from_one_user_does_not_starve_another():
    """One slot: A holds it, queues two more; B queues one. When A's first finishes, B is
    admitted before A's queued ones (FIFO would give A, A, A, B)."""
    admission = Admission(max_running=1, per_user=1)
    release = {name: threading.Event() for name in ("A1", "A2", "A3", "B1")}
    threads = []

    def run(name):
        with admission.slot(name[0], time.monotonic() + 30):
            release[name].wait(10)

    def start(name):
        before = (len(admission._waiting), len(admission.admitted))
        t = threading.Thread(target=run, args=(name,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while (len(admission._waiting), len(admission.admitted)) == before and time.monotonic() < deadline:
            time.sleep(0.005)

    start("A1")
    for name in ("A2", "A3", "B1"):
        start(name)
    assert admission.admitted == ["A"]
    for name in ("A1", "B1", "A2", "A3"):
        release[name].set()
    for t in threads:
        t.join(10)
    assert admission.admitted == ["A", "B", "A", "A"]


def test_a_user_waits_for_their_own_slot_while_others_run():
    admission = Admission(max_running=3, per_user=1)
    inside = threading.Event()
    out = threading.Event()

    def hold():
        with admission.slot("A", time.monotonic() + 10):
            inside.set()
            out.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    with admission.slot("B", time.monotonic() + 1):   # another user: admitted at once
        pass
    with pytest.raises(QueryRefused) as info:        # A's second query: waits, then gives up
        with admission.slot("A", time.monotonic() + 0.2):
            pass
    assert info.value.code == "guard_busy"
    out.set()
    t.join(10)
    assert admission.admitted == ["A", "B"]
