"""The guard service with the REAL guard: protected results through HTTP and the ibis
client, the same answers in-process, kill -9 and restart under load, and a new snapshot
becoming visible while queries run.

Tokens are checked by the real HubOAuth client against the hub API double; the full hub
path is in test_client_hub.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import ibis
import pytest
import requests

from sekisho.client import GuardRefusal
from sekisho.guard import Guard
from sekisho.policy import load_instance_policy
from sekisho.services.guard import GuardService
from sekisho.store import Store
from client_fixtures import (GUARD_SCOPE, HubApiDouble, ServiceProcess, ServiceThread, hub_oauth,
                             real_guard_instance, remove_instance)

TOKENS = {"ana": "tok-e2e-ana-000001", "ana2": "tok-e2e-ana2-00001", "stew": "tok-e2e-stew-00001"}
GROUPED = "SELECT block, count(*) AS n FROM residents GROUP BY block ORDER BY block"


@pytest.fixture(scope="module")
def hub_api():
    hub = HubApiDouble().start()
    for user, token in TOKENS.items():
        hub.add_token(token, user, [GUARD_SCOPE])
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def inst():
    instance = real_guard_instance()
    yield instance
    remove_instance(instance)


@pytest.fixture(scope="module")
def served(inst, hub_api):
    svc = GuardService(inst, hub_auth=hub_oauth(hub_api.api_url), workers=4)
    thread = ServiceThread(svc).start()
    yield thread
    thread.stop()
    svc.pool.shutdown()


def connect(served, user="ana"):
    return ibis.sekisho.connect(url=served.url, token=TOKENS[user])


def test_grouped_count_is_protected_and_matches_in_process(served, inst):
    con = connect(served)
    df = con.sql(GROUPED).execute()
    assert len(df) == 13 and set(df.columns) == {"block", "n"}
    summary = df.attrs["sekisho"]
    assert summary["mode"] == "threshold" and isinstance(summary["query_id"], int)
    entry = [e for e in inst.audit.entries(type="query") if e["seq"] == summary["query_id"]]
    assert entry and entry[0]["user"] == "ana" and entry[0]["details"]["sql"] == GROUPED
    # in-process (reports' mode) gives the same protected values: consistent perturbation
    local = ibis.sekisho.connect(home=inst.home, user="ana").sql(GROUPED).execute()
    assert local[["block", "n"]].values.tolist() == df[["block", "n"]].values.tolist()


def test_ibis_expression_through_the_service(served):
    con = connect(served)
    t = con.table("residents")
    old = t.filter(t.age >= 65)
    df = old.group_by("block").agg(n=old.count()).order_by("block").execute()
    assert len(df) >= 1 and df.attrs["sekisho"]["mode"] == "threshold"
    assert "person_id" not in df.columns and "_rkey" not in df.columns


def test_row_level_query_is_refused_with_the_guards_code(served):
    con = connect(served)
    with pytest.raises(GuardRefusal) as info:
        con.sql("SELECT * FROM residents").execute()
    assert info.value.code in ("row_level_output", "privacy_unit_in_expression")
    with pytest.raises(GuardRefusal) as info:
        con.table("residents").execute()
    assert info.value.code in ("row_level_output", "privacy_unit_in_expression")


@pytest.mark.parametrize("payload,code", [
    ({"sql": "  "}, "empty_query"),
    ({"sql": "x" * 100_001}, "too_complex"),
    ({"sql": GROUPED, "mode": "raw"}, "mode_not_allowed"),
    ({"sql": GROUPED, "mode": "dp", "epsilon": -1}, "epsilon_invalid"),
    ({"sql": GROUPED, "mode": "dp", "epsilon": 1e9}, "epsilon_invalid"),
    ({"sql": GROUPED, "mode": "threshold", "epsilon": 0.5}, "epsilon_invalid"),
])
def test_the_guard_judges_the_values_once_and_refuses_with_422(served, inst, payload, code):
    """The service passes a well-formed request's values to the guard, which validates them
    for every entry point alike: a refusal (audited), 422 like any other."""
    r = requests.post(served.url + "api/query", json=payload, timeout=60,
                      headers={"Authorization": f"token {TOKENS['ana']}"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code
    assert [e for e in inst.audit.entries(type="query.refused") if e["details"].get("code") == code]
    if payload["sql"] == GROUPED:   # in-process (reports, CLI): the same guard, the same refusal
        with pytest.raises(GuardRefusal) as info:
            ibis.sekisho.connect(home=inst.home, user="ana").sql(GROUPED).execute(
                mode=payload["mode"], epsilon=payload.get("epsilon"))
        assert info.value.code == code


def test_dp_query_debits_the_callers_budget(served, inst):
    con = connect(served, "ana2")
    before = con.budget()["spent"]
    df = con.sql("SELECT sex, count(*) AS n FROM residents GROUP BY sex").execute(mode="dp", epsilon=0.1)
    assert df.attrs["sekisho"]["mode"] == "dp"
    assert con.budget()["spent"] == pytest.approx(before + 0.1)
    assert Guard(inst).budget("ana2")["spent"] == pytest.approx(before + 0.1)


def test_steward_has_no_views_and_is_denied(served):
    r = requests.get(served.url + "api/views", headers={"Authorization": f"token {TOKENS['stew']}"},
                     timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "role_not_allowed"


def test_describe_reads_no_data(served):
    con = connect(served)
    expr = con.sql("SELECT age_band, count(*) AS n FROM residents GROUP BY age_band")
    assert list(expr.schema().names) == ["age_band", "n"]


def _snapshot_copy_with_more_people(inst, extra_instance) -> None:
    """Write a new snapshot into ``inst`` holding ``extra_instance``'s data (a new ingest)."""
    src_store = Store(extra_instance)
    src = src_store.snapshots_dir / src_store.current_id() / "data.duckdb"
    with Store(inst).writer(policy_version=inst.policy_version) as w:
        con = w.connect()
        con.execute(f"ATTACH '{src}' AS src (READ_ONLY)")
        for (name,) in con.execute("SELECT table_name FROM information_schema.tables "
                                   "WHERE table_catalog = 'src' AND table_schema = 'main'").fetchall():
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM src."{name}"')
        con.execute("DETACH src")
        con.close()
        w.commit()


def test_new_snapshot_becomes_visible_while_queries_run(served, inst):
    total_sql = "SELECT count(*) AS n FROM residents"
    con = connect(served)
    before = int(con.sql(total_sql).execute()["n"].iloc[0])
    bigger = real_guard_instance(persons=4500)
    errors, results = [], []
    stop = threading.Event()

    def load():
        c = connect(served)
        while not stop.is_set():
            try:
                results.append(int(c.sql(total_sql).execute()["n"].iloc[0]))
            except Exception as e:  # any failure during the switch is a bug
                errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        _snapshot_copy_with_more_people(inst, bigger)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        remove_instance(bigger)
    after = int(con.sql(total_sql).execute()["n"].iloc[0])
    assert errors == []
    d = load_instance_policy(inst).disclosure.perturbation.max_noise   # every count is within ±D
    assert abs(before - 3001) <= d and abs(after - 4501) <= d
    # every answer came from one snapshot or the other, never a mixture
    assert all(abs(n - 3001) <= d or abs(n - 4501) <= d for n in results)
    assert inst.audit.verify().ok


# ---- kill -9 and restart under load --------------------------------------------------------

def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_kill9_and_restart_mid_load_loses_nothing(inst, hub_api):
    service = ServiceProcess(inst.home, hub_api.api_url).start()
    warm = requests.post(service.url + "api/query", json={"sql": GROUPED},
                         headers={"Authorization": f"token {TOKENS['ana']}"}, timeout=60)
    assert warm.status_code == 200
    guard = Guard(inst)
    spent_before = {u: guard.budget(u)["spent"] for u in ("ana", "ana2")}
    seq_before = inst.audit.head()[0]
    answered: list[tuple[str, int, str, float]] = []
    failures: list[str] = []
    unanswered = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    eps = 0.01

    def client(user: str, i: int):
        session = requests.Session()
        session.headers["Authorization"] = f"token {TOKENS[user]}"
        n = 0
        while not stop.is_set():
            n += 1
            dp = (n + i) % 2 == 0
            payload = {"sql": "SELECT sex, count(*) AS n FROM residents GROUP BY sex", "format": "json"}
            if dp:
                payload.update(mode="dp", epsilon=eps)
            try:
                r = session.post(service.url + "api/query", json=payload, timeout=60)
            except requests.RequestException:
                with lock:
                    unanswered[(user, "dp" if dp else "threshold")] += 1
                time.sleep(0.25)   # the service is down: retry gently
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            s = r.json()["summary"]
            with lock:
                answered.append((user, s["query_id"], s["mode"], s.get("epsilon_spent") or 0.0))

    threads = [threading.Thread(target=client, args=(u, i)) for i, u in enumerate(["ana", "ana2"] * 2)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(answered) >= 12, 60)
        killed_at = len(answered)
        service.kill9()            # mid-load: requests are in flight
        service.start(timeout=90)  # what the hub does for a managed service that died
        _wait_for(lambda: len(answered) >= killed_at + 12, 90)
    finally:
        stop.set()
        for t in threads:
            t.join(90)

    try:
        assert failures == []
        assert killed_at >= 12 and len(answered) >= killed_at + 12
        assert sum(unanswered.values()) >= 1, "the kill did not interrupt any request"
        verify = inst.audit.verify()
        assert verify.ok, [str(p) for p in verify.problems]
        audited = [e for e in inst.audit.entries(type="query") if e["seq"] > seq_before]
        entries = {e["seq"]: e for e in audited if e["type"] == "query"}
        requests_ = {e["seq"]: e for e in audited if e["type"] == "query.request"}
        ids = [a[1] for a in answered]
        assert len(ids) == len(set(ids)), "a query id was answered twice"
        for user, seq, mode, _ in answered:   # every answered query is in the audit log
            assert seq in entries and entries[seq]["user"] == user
            assert entries[seq]["details"]["mode"] == mode
            request = requests_[entries[seq]["details"]["request"]]   # ... after its request entry
            assert request["user"] == user and request["seq"] < seq
            assert request["details"]["sql"] == entries[seq]["details"]["sql"]
        # a request the kill interrupted is still on record: at least as many request
        # entries as answers and refusals together
        assert len(requests_) >= len(entries)
        for user in ("ana", "ana2"):
            audited_dp = sum(e["details"]["epsilon_spent"] for e in entries.values()
                             if e["user"] == user and e["details"]["mode"] == "dp")
            answered_dp = sum(a[3] for a in answered if a[0] == user and a[2] == "dp")
            spent = Guard(inst).budget(user)["spent"] - spent_before[user]
            # no refund: the ledger holds every audited debit; at most one more per request
            # that got no answer (killed between its debit and its audit entry)
            assert spent >= audited_dp - 1e-9 >= answered_dp - 1e-9
            assert spent <= audited_dp + unanswered[(user, "dp")] * eps + 1e-9
        r = requests.get(service.url + "api/budget", headers={"Authorization": f"token {TOKENS['ana']}"},
                         timeout=30)
        assert r.status_code == 200
    finally:
        service.stop()
