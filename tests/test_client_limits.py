"""Time limits and load as the analyst sees them through the guard service (issue 17).

* The client's own timeout says what happened: "the query took longer than N s"
  (Japanese first), a ``GuardTimeout`` — not "cannot reach the guard".
* The guard's time/memory stop (``resource_limit``, HTTP 422) and its admission refusal
  (``guard_busy``, HTTP 503) arrive as ``GuardRefusal`` with the guard's bilingual text;
  other 503s (``audit_unavailable``) stay ``GuardError``.
* The service's worker pool dispatches waiting calls in fair order (shown by its
  dispatch order, not by timings) and answers a call that waited past the guard's query
  time ``guard_busy``, audited.

The first part uses a test double of the guard that is slow or refuses on request; the
last tests run the real guard with a statement made slow (as tests/test_guard_limits.py does).
"""

from __future__ import annotations

import asyncio
import threading
import time

import ibis
import pytest
import requests

from client_fixtures import GUARD_SCOPE, GuardDouble, HubApiDouble, ServiceThread, hub_oauth, json_body
from sekisho.audit import AuditError
from sekisho.client import GuardError, GuardRefusal, GuardTimeout
from sekisho.client.transport import HttpTransport
from sekisho.guard import QueryRefused
from sekisho.instance import Instance
from sekisho.services.guard import GuardPool, GuardService, PoolBusy
from sekisho.state import set_role

TOKENS = {"tanaka": "tok-limits-tanaka", "suzuki": "tok-limits-suzuki"}
GROUPED = "SELECT block, count(*) AS n FROM residents GROUP BY block"


class TimedGuard(GuardDouble):
    """The guard double, slow or refusing when the SQL says so."""

    release = threading.Event()

    def query(self, sql: str, **kwargs):
        if "slow" in sql:
            time.sleep(1.5)
        if "held" in sql:
            self.release.wait(30)
        if "resource" in sql:
            raise QueryRefused("resource_limit")
        if "busy" in sql:
            raise QueryRefused("guard_busy")
        if "audit" in sql:
            raise AuditError("disk full")
        return super().query(sql, **kwargs)


@pytest.fixture(scope="module")
def hub():
    hub = HubApiDouble().start()
    for user, token in TOKENS.items():
        hub.add_token(token, user, [GUARD_SCOPE])
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("limits") / "home")
    for user in TOKENS:
        set_role(inst, user, "analyst")
    return inst


@pytest.fixture(scope="module")
def served(hub, instance):
    svc = GuardService(instance, hub_auth=hub_oauth(hub.api_url), guard_factory=TimedGuard, workers=2,
                       wait_seconds=0.5, refusal_types=(QueryRefused,))
    thread = ServiceThread(svc).start()
    yield thread
    TimedGuard.release.set()
    thread.stop()
    svc.pool.shutdown()


def connect(served, user="tanaka", **kwargs):
    return ibis.sekisho.connect(url=served.url, token=TOKENS[user], **kwargs)


# ---- the client's timeout ------------------------------------------------------------------------
def test_a_query_longer_than_the_client_timeout_says_so(served):
    con = connect(served)   # connecting (views) and describing under load may take > 0.5 s
    expr = con.sql("SELECT block, count(*) AS slow FROM residents GROUP BY block")
    con._transport.timeout = 0.5   # only the query's own call is timed
    started = time.monotonic()
    with pytest.raises(GuardTimeout) as info:
        expr.execute()
    assert time.monotonic() - started < 1.4            # gave up at its timeout, not at the answer
    message = str(info.value)
    assert "the query took longer than 0.5 s" in message and "0.5 秒以上" in message
    assert message.index("0.5 秒以上") < message.index("the query took longer")   # Japanese first
    assert "cannot reach" not in message and "接続できません" not in message
    assert isinstance(info.value, GuardError) and info.value.code == "client_timeout" and info.value.timeout == 0.5
    time.sleep(1.2)                                      # the slow call finishes on the service
    assert len(con.sql(GROUPED).execute()) == 2          # and the guard answers the next one


def test_an_unreachable_guard_is_still_cannot_reach():
    with pytest.raises(GuardError, match="cannot reach") as info:
        ibis.sekisho.connect(url="http://127.0.0.1:9/services/guard/", token="tok-whatever-1", timeout=0.5)
    assert not isinstance(info.value, GuardTimeout)


# ---- the guard's limits --------------------------------------------------------------------------
def test_resource_limit_is_a_refusal_with_the_guards_text(served):
    r = requests.post(served.url + "api/query", json={"sql": "SELECT resource FROM residents"},
                      headers={"Authorization": f"token {TOKENS['tanaka']}"}, timeout=10)
    assert r.status_code == 422 and json_body(r)["code"] == "resource_limit"
    with pytest.raises(GuardRefusal) as info:
        connect(served).sql("SELECT block, count(*) AS resource FROM residents GROUP BY block").execute()
    assert info.value.code == "resource_limit"
    assert info.value.reason == QueryRefused("resource_limit").reason
    assert "上限に達したため中止しました" in str(info.value) and "time or memory limit" in str(info.value)


def test_guard_busy_is_a_503_and_a_refusal(served):
    r = requests.post(served.url + "api/query", json={"sql": "SELECT busy FROM residents"},
                      headers={"Authorization": f"token {TOKENS['tanaka']}"}, timeout=10)
    assert r.status_code == 503 and json_body(r)["code"] == "guard_busy"
    with pytest.raises(GuardRefusal) as info:
        connect(served).sql("SELECT block, count(*) AS busy FROM residents GROUP BY block").execute()
    assert info.value.code == "guard_busy"
    assert "混み合っている" in str(info.value) and "busy" in str(info.value)


def test_audit_unavailable_stays_a_guard_error(served):
    with pytest.raises(GuardError) as info:
        connect(served).sql("SELECT block, count(*) AS audit FROM residents GROUP BY block").execute()
    assert not isinstance(info.value, GuardRefusal)
    assert info.value.status == 503 and info.value.code == "audit_unavailable"


# ---- the worker pool -----------------------------------------------------------------------------
def test_waiting_calls_are_dispatched_in_fair_order(instance):
    """One thread: A's first call holds it, A queues three more, then B one. When A's
    first finishes B goes next (fewest calls in progress, then least recently served),
    then A's others — B does not wait behind A's whole burst."""
    pool = GuardPool(instance, GuardDouble, workers=1, wait_seconds=30)
    gate = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(pool.run("A", gate.wait, 10))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(pool.run("A", lambda: None)) for _ in range(3)]
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(pool.run("B", lambda: None))
        await asyncio.sleep(0.05)
        assert list(pool.dispatched) == ["A"]           # the others wait, without a thread
        gate.set()
        await asyncio.gather(first, *rest, b)

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert list(pool.dispatched) == ["A", "B", "A", "A", "A"]


def test_one_users_burst_leaves_threads_for_others(instance):
    """Four threads, at most two calls of one user in progress: A's burst of four takes
    two threads, B's call the third at once — it does not wait for A's calls to end."""
    pool = GuardPool(instance, GuardDouble, workers=4, per_user=2, wait_seconds=30)
    gate = threading.Event()

    async def scenario():
        burst = [asyncio.ensure_future(pool.run("A", gate.wait, 10)) for _ in range(4)]
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(pool.run("B", lambda: "B done"))
        assert await asyncio.wait_for(b, 5) == "B done"
        assert list(pool.dispatched) == ["A", "A", "B"]
        gate.set()
        await asyncio.gather(*burst)

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert list(pool.dispatched) == ["A", "A", "B", "A", "A"]


def test_a_call_waiting_past_the_query_time_is_busy(instance):
    pool = GuardPool(instance, GuardDouble, workers=1, wait_seconds=0.2)
    gate = threading.Event()

    async def scenario():
        held = asyncio.ensure_future(pool.run("A", gate.wait, 10))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolBusy):
            await pool.run("B", lambda: None)
        gate.set()
        await held
        assert await pool.run("B", lambda: 42) == 42     # the slot came back

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


def test_a_busy_service_answers_guard_busy_and_audits_the_query(served, instance):
    """Both threads held by tanaka's queries: suzuki's query waits past the service's
    wait limit (0.5 s here; the guard's query_seconds by default) and is refused
    ``guard_busy`` — a refusal the client shows as such, on record in the audit trail."""
    transport = HttpTransport(served.url, TOKENS["suzuki"])
    TimedGuard.release.clear()
    held = []
    try:
        for _ in range(2):
            t = threading.Thread(target=lambda: held.append(requests.post(
                served.url + "api/query", json={"sql": "SELECT held FROM residents"},
                headers={"Authorization": f"token {TOKENS['tanaka']}"}, timeout=30)))
            t.start()
            held.append(t)
        time.sleep(0.3)
        sql = "SELECT block, count(*) AS n FROM residents WHERE block = '灘' GROUP BY block"
        with pytest.raises(GuardRefusal) as info:
            transport.query(sql, mode=None, epsilon=None)
        assert info.value.code == "guard_busy"
    finally:
        TimedGuard.release.set()
        for t in held:
            if isinstance(t, threading.Thread):
                t.join(10)
    entry = [e for e in instance.audit.entries(type="query.refused") if e["details"].get("code") == "guard_busy"][-1]
    assert entry["user"] == "suzuki" and entry["details"]["sql"] == sql
    assert entry["details"]["via"] == "guard-service" and entry["outcome"] == "refused"
    assert [r.status_code for r in held if isinstance(r, requests.Response)] == [200, 200]


# ---- the real guard ------------------------------------------------------------------------------
SLOW = "SELECT COUNT(*) AS __n FROM range(100000000000) AS a(i) WHERE i * i % 7 = 3"   # hours, if let run


@pytest.fixture(scope="module")
def real(tmp_path_factory, hub):
    import yaml

    from guard_fixtures import make_instance

    inst = make_instance(tmp_path_factory.mktemp("limits-real") / "inst", persons=2000, seed=17)
    config = yaml.safe_load((inst.home / "config.yaml").read_text(encoding="utf-8"))
    config["guard"] = {"query_seconds": 2}
    (inst.home / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    inst = Instance.open(inst.home)
    hub.add_token("tok-limits-real-ana", "ana", [GUARD_SCOPE])
    svc = GuardService(inst, hub_auth=hub_oauth(hub.api_url))
    thread = ServiceThread(svc).start()
    yield thread, inst
    thread.stop()
    svc.pool.shutdown()


def slowed(monkeypatch):
    """Every cells statement of the real guard replaced by one that runs for hours."""
    from sekisho.guard import protection

    original = protection.fetch
    monkeypatch.setattr(protection, "fetch", lambda snap, sql, **kw: original(snap, SLOW, **kw))


def test_real_guard_stops_a_long_query_and_the_client_shows_resource_limit(real, monkeypatch):
    served, inst = real
    con = ibis.sekisho.connect(url=served.url, token="tok-limits-real-ana", timeout=60)
    con.sql("SELECT sex, count(*) AS n FROM residents GROUP BY sex").execute()   # warm
    with monkeypatch.context() as patch:
        slowed(patch)
        started = time.monotonic()
        with pytest.raises(GuardRefusal) as info:
            con.sql("SELECT block, count(*) AS n FROM residents GROUP BY block").execute()
        assert time.monotonic() - started < 30
    assert info.value.code == "resource_limit" and "time or memory limit" in str(info.value)
    # audited by the guard, and the service answers the next query
    assert con.sql("SELECT sex, count(*) AS n FROM residents WHERE age >= 20 GROUP BY sex").execute().shape[0] == 2


def test_real_guard_client_timeout_shorter_than_the_guards_limit(real, monkeypatch):
    served, inst = real
    con = ibis.sekisho.connect(url=served.url, token="tok-limits-real-ana", timeout=0.5)
    with monkeypatch.context() as patch:
        slowed(patch)
        with pytest.raises(GuardTimeout, match=r"the query took longer than 0\.5 s"):
            con.sql("SELECT age_band, count(*) AS n FROM residents GROUP BY age_band").execute()
        time.sleep(1)    # the client has gone: the service cancels the query (before the guard's 2 s)
    con = ibis.sekisho.connect(url=served.url, token="tok-limits-real-ana", timeout=60)
    assert con.sql("SELECT sex, count(*) AS n FROM residents WHERE age >= 30 GROUP BY sex").execute().shape[0] == 2
    refused = {e["details"].get("code") for e in inst.audit.entries(type="query.refused")
               if "age_band" in e["details"].get("sql", "")}
    assert refused == {"cancelled"}, refused   # audited as cancelled, not left to run to resource_limit
