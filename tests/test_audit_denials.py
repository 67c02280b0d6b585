"""Every denial is on record (issue 19 item 5).

* ``sekisho.audit.DenialLog``: the first 401/403 of a source and minute is written at
  once, the rest counted into one ``access.denied`` entry per minute; a flood from ever
  new sources is capped per minute.
* The guard service: a 401 (no token) on record, aggregated; a refusal at the describe
  step (``con.sql("SELECT * FROM residents")`` through the ibis client and the real
  guard) on record.
* The reports service: a 403 on record, aggregated.
* The hub: its own 401/403 on record through its ``log_function`` (unit, and one test
  against a real hub).
* The audit page shows the full head, which ``sekisho audit verify --expect-head``
  accepts; requests without an outcome are flagged; report views per person.
"""

from __future__ import annotations

import copy
import re
import secrets
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import ibis
import pytest
import requests
from tornado.testing import AsyncHTTPTestCase

from client_fixtures import (GUARD_SCOPE, FakeRefused, GuardDouble, HubApiDouble, ServiceThread, _LoopThread,
                             hub_oauth, json_body, real_guard_instance, remove_instance)
from hubauth_doubles import FixedHubOAuth
from hubauth_doubles import user_model as model
from sekisho.access import AUDIT_REVIEW_SCOPE, REPORTS_READ_SCOPE
from sekisho.audit import DENIAL_TYPE, Denial, DenialLog
from sekisho.audit.denials import OVERFLOW
from sekisho.client import GuardRefusal
from sekisho.hub.denials import HubDenialLog
from sekisho.instance import TOKYO, Instance
from sekisho.reports.index import write_index
from sekisho.services.audit_activity import person_activity, unanswered_requests
from sekisho.services.audit_review import ROUTES, app_settings
from sekisho.services.guard import GuardService
from sekisho.services.hubauth import make_app
from sekisho.services.reports import ReportsService
from sekisho.state import set_role

SEKISHO = str(Path(sys.executable).with_name("sekisho"))


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture()
def inst(tmp_path):
    instance = Instance.create(tmp_path / "home")
    set_role(instance, "tanaka", "analyst")
    return instance


def denied(instance, type_=DENIAL_TYPE):
    return [e for e in instance.audit.entries(type=type_) if e["outcome"] == "denied"]


def settled(instance, denial_log, before, expected, timeout=10.0):
    """The aggregates written since ``before``, once ``expected`` denials are counted: a
    service records a denial in ``on_finish``, just after the client has its answer."""
    deadline = time.monotonic() + timeout
    while denial_log.pending() < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    denial_log.flush_all()
    return denied(instance)[before:]


# ---- DenialLog -----------------------------------------------------------------------

def test_first_denial_is_written_at_once_the_rest_once_per_minute(inst):
    clock = Clock(datetime(2026, 12, 6, 10, 0, 5, tzinfo=TOKYO))
    log = DenialLog(inst.audit, "guard", flush_seconds=None, clock=clock)
    first = log.record(Denial(401, "unauthenticated", "/services/guard/api/views", "ViewsHandler",
                              remote_ip="10.0.0.9"))
    assert first is not None and first["type"] == DENIAL_TYPE
    for i in range(499):
        assert log.record(Denial(401, "unauthenticated", f"/services/guard/api/views?x={i}", "ViewsHandler",
                                 remote_ip="10.0.0.9")) is None
    assert len(denied(inst)) == 1                   # the flood is counted, not written
    assert log.flush() == 0                         # the minute is not over yet
    clock.now += timedelta(minutes=1)
    assert log.flush() == 1
    entries = denied(inst)
    assert len(entries) == 2
    agg = entries[-1]
    assert agg["details"]["count"] == 499 and agg["details"]["aggregated"] is True
    assert agg["details"]["first_seq"] == first["seq"]
    assert agg["details"]["minute"] == "2026-12-06T10:00" and agg["details"]["source"] == "ip:10.0.0.9"
    assert agg["user"] == "(unauthenticated)" and len(agg["details"]["paths"]) == 10
    assert inst.audit.verify().ok


def test_a_new_minute_or_another_source_opens_a_new_bucket(inst):
    clock = Clock(datetime(2026, 12, 6, 10, 0, 59, tzinfo=TOKYO))
    log = DenialLog(inst.audit, "reports", flush_seconds=None, clock=clock)
    d = Denial(403, "missing_scope", "/services/reports/", "IndexPage", user="tanaka", credential="token:aa")
    assert log.record(d) is not None
    assert log.record(d) is None
    assert log.record(Denial(403, "missing_scope", "/services/reports/", "IndexPage", user="tanaka",
                             credential="token:bb")) is not None    # another credential
    clock.now += timedelta(seconds=2)                                # the next minute
    assert log.record(d) is not None
    assert log.flush_all() == 1                                      # the one counted in 10:00
    assert [e["details"].get("count") for e in denied(inst)] == [1, 1, 1, 1]


def test_a_flood_from_ever_new_sources_is_capped_per_minute(inst):
    clock = Clock(datetime(2026, 12, 6, 10, 0, 0, tzinfo=TOKYO))
    log = DenialLog(inst.audit, "audit", max_buckets=5, flush_seconds=None, clock=clock)
    for i in range(2000):   # e.g. a forged X-Forwarded-For per request
        log.record(Denial(401, "unauthenticated", "/services/audit/", "IndexHandler", remote_ip=f"10.1.{i // 250}.{i % 250}"))
    assert len(denied(inst)) == 5
    log.flush_all()
    entries = denied(inst)
    assert len(entries) == 6
    overflow = entries[-1]["details"]
    assert overflow["source"] == OVERFLOW and overflow["count"] == 1995 and overflow["sources"] == 1000
    assert sum(e["details"]["count"] for e in entries) == 2000 - 0   # every denial counted once


def test_a_first_entry_that_cannot_be_written_is_not_lost_as_counted(inst):
    log = DenialLog(inst.audit, "guard", flush_seconds=None)
    d = Denial(401, "unauthenticated", "/x", "H", remote_ip="10.0.0.1")

    def broken(_):
        raise OSError("disk full")

    with pytest.raises(OSError):
        log.record(d, first=broken)
    assert log.record(d) is not None    # the next one is the bucket's first again


# ---- the guard service -----------------------------------------------------------------

@pytest.fixture(scope="module")
def guard_double_service(tmp_path_factory):
    instance = Instance.create(tmp_path_factory.mktemp("den") / "home")
    set_role(instance, "tanaka", "analyst")
    hub = HubApiDouble().start()
    hub.add_token("tok-analyst-0001", "tanaka", [GUARD_SCOPE])
    svc = GuardService(instance, hub_auth=hub_oauth(hub.api_url), guard_factory=GuardDouble,
                       refusal_types=(FakeRefused,), workers=2)
    svc.denials.flush_seconds = None
    thread = ServiceThread(svc).start()
    yield SimpleNamespace(svc=svc, url=thread.url, instance=instance)
    thread.stop()
    hub.stop()
    svc.pool.shutdown()


def test_a_401_at_the_guard_is_on_record_and_aggregated(guard_double_service):
    s = guard_double_service
    s.svc.denials.flush_all()
    s.svc.denials.clock = Clock(datetime(2026, 12, 6, 11, 0, 1, tzinfo=TOKYO))   # no minute boundary mid-test
    before_first = len(denied(s.instance, "query.refused"))
    before_agg = len(denied(s.instance))
    for _ in range(6):
        r = requests.get(s.url + "api/views", timeout=30)
        assert r.status_code == 401 and "views" not in json_body(r)
    aggs = settled(s.instance, s.svc.denials, before_agg, 5)
    firsts = denied(s.instance, "query.refused")[before_first:]
    assert len(firsts) == 1
    first = firsts[0]
    assert first["user"] == "(unauthenticated)" and first["details"]["code"] == "unauthenticated"
    assert first["details"]["path"] == "/services/guard/api/views" and first["details"]["status"] == 401
    assert first["details"]["remote_ip"] == "127.0.0.1"
    assert len(aggs) == 1 and aggs[0]["details"]["count"] == 5
    assert aggs[0]["details"]["service"] == "guard" and aggs[0]["details"]["first_seq"] == first["seq"]
    assert s.instance.audit.verify().ok


def test_a_refusal_at_the_describe_step_is_on_record(guard_double_service):
    s = guard_double_service
    r = requests.post(s.url + "api/describe", json={"sql": "SELECT * FROM residents"},
                      headers={"Authorization": "token tok-analyst-0001"}, timeout=30)
    assert r.status_code != 200 and json_body(r)["code"] == "row_level_output"
    last = [e for e in s.instance.audit.entries(type="query.refused")][-1]
    assert last["user"] == "tanaka" and last["outcome"] == "refused"
    assert last["details"]["stage"] == "describe" and last["details"]["sql"] == "SELECT * FROM residents"
    assert last["details"]["code"] == "row_level_output"


@pytest.mark.slow
def test_con_sql_refused_while_describing_is_on_record_with_the_real_guard():
    instance = real_guard_instance()
    hub = HubApiDouble().start()
    try:
        hub.add_token("tok-describe-0001", "ana", [GUARD_SCOPE])
        svc = GuardService(instance, hub_auth=hub_oauth(hub.api_url), workers=2)
        thread = ServiceThread(svc).start()
        try:
            con = ibis.sekisho.connect(url=thread.url, token="tok-describe-0001")
            before = len(list(instance.audit.entries(type="query.refused")))
            with pytest.raises(GuardRefusal):
                con.sql("SELECT * FROM residents")        # refused while ibis describes the schema
            refused = list(instance.audit.entries(type="query.refused"))[before:]
            assert len(refused) == 1
            entry = refused[0]
            assert entry["user"] == "ana" and entry["role"] == "analyst" and entry["outcome"] == "refused"
            assert entry["details"]["stage"] == "describe"
            assert entry["details"]["sql"] == "SELECT * FROM residents"
            assert not list(instance.audit.entries(type="query.request"))   # nothing ran
        finally:
            thread.stop()
            svc.pool.shutdown()
    finally:
        hub.stop()
        remove_instance(instance)


# ---- the reports service -----------------------------------------------------------------

def test_a_403_at_the_reports_service_is_on_record_and_aggregated(tmp_path):
    instance = Instance.create(tmp_path / "home")
    set_role(instance, "steward1", "steward")
    write_index(instance.published_dir, {"reports": {}})
    hub = HubApiDouble().start()
    hub.add_token("tok-steward-0001", "steward1", ["access:services!service=reports", REPORTS_READ_SCOPE])
    svc = ReportsService(instance, hub_auth=hub_oauth(hub.api_url))
    svc.denials.flush_seconds = None
    svc.denials.clock = Clock(datetime(2026, 12, 6, 11, 0, 1, tzinfo=TOKYO))   # no minute boundary mid-test
    thread = _LoopThread(svc.make_app).start()
    url = f"http://127.0.0.1:{thread.port}/services/reports/"
    try:
        for _ in range(4):
            r = requests.get(url + "r/01_人口/", headers={"Authorization": "token tok-steward-0001"},
                             allow_redirects=False, timeout=30)
            assert r.status_code == 403
        firsts = denied(instance, "report.view")
        assert len(firsts) == 1
        assert firsts[0]["user"] == "steward1" and firsts[0]["details"]["code"] == "role_not_allowed"
        assert firsts[0]["details"]["path"] == "/services/reports/r/01_%E4%BA%BA%E5%8F%A3/"
        aggs = settled(instance, svc.denials, 0, 3)
        assert len(aggs) == 1 and aggs[0]["details"]["count"] == 3 and aggs[0]["user"] == "steward1"
        assert aggs[0]["details"]["source"].startswith("user:steward1 (token:")
    finally:
        thread.stop()
        hub.stop()


# ---- the hub -------------------------------------------------------------------------------

class _FakeHandler:
    def __init__(self, status, path="/hub/api/users", user=None, method="GET", headers=None):
        self._status, self._user = status, user
        self.request = SimpleNamespace(path=path, remote_ip="192.0.2.7", method=method, headers=headers or {})
        self._reason = "Forbidden"

    def get_status(self):
        return self._status

    @property
    def current_user(self):
        return self._user


def test_the_hub_log_function_records_its_denials(inst):
    logged = []
    hub_log = HubDenialLog(inst, log_function=logged.append)
    hub_log.denials.flush_seconds = None
    hub_log(_FakeHandler(200))
    hub_log(_FakeHandler(302))
    hub_log(_FakeHandler(403, user=SimpleNamespace(name="tanaka"), headers={"Authorization": "token abc"}))
    for _ in range(3):
        hub_log(_FakeHandler(401, path="/hub/api/users/x"))
    assert len(logged) == 6                         # JupyterHub's own log still sees every request
    entries = denied(inst)
    assert [(e["user"], e["details"]["status"]) for e in entries] == [("tanaka", 403), ("(unauthenticated)", 401)]
    assert entries[0]["role"] == "analyst" and entries[0]["details"]["service"] == "hub"
    assert entries[0]["details"]["path"] == "/hub/api/users"
    hub_log.denials.flush_all()
    assert denied(inst)[-1]["details"]["count"] == 2


def test_failed_logins_stay_login_failed_entries(inst):
    from jupyterhub.handlers.login import LoginHandler

    handler = object.__new__(LoginHandler)
    handler.get_status = lambda: 403
    HubDenialLog(inst, log_function=lambda h: None).record(handler)
    assert denied(inst) == []


def test_the_hub_configuration_installs_the_log_function(inst):
    from traitlets.config import Config

    from sekisho.hub.config import configure

    c = Config()
    configure(c, inst.home)
    log_function = c.JupyterHub.tornado_settings["log_function"]
    assert isinstance(log_function, HubDenialLog) and log_function.instance.home == inst.home
    # JupyterHub deep-copies its configuration: the one denial log survives it
    assert copy.deepcopy(c).JupyterHub.tornado_settings["log_function"] is log_function


@pytest.mark.hub
def test_a_403_at_the_real_hub_is_on_record(hub):
    # the hub takes the client address from X-Real-Ip (behind its proxy): a fresh source,
    # so this request opens its own bucket whatever other tests sent this minute
    source = f"198.51.100.{secrets.randbelow(250) + 1}"
    before = len(denied(hub.instance))
    r = requests.get(hub.url + "hub/api/users", timeout=30,
                     headers={"Authorization": "token forged0123456789abcdef", "X-Real-Ip": source})
    assert r.status_code in (401, 403)
    deadline = time.monotonic() + 10   # the hub logs a request just after its answer has left
    while True:
        entries = [e for e in denied(hub.instance)[before:] if e["details"].get("remote_ip") == source]
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert entries, "the hub's denial is not on record: " + (hub.log_path.read_text()[-3000:] if hub.log_path else "")
    entry = entries[-1]["details"]
    assert entry["service"] == "hub" and entry["path"] == "/hub/api/users" and entry["status"] == r.status_code


# ---- the audit page --------------------------------------------------------------------

@pytest.fixture(scope="module")
def page_instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("audit-page") / "inst")
    set_role(inst, "kansa", "admin")
    set_role(inst, "tanaka", "analyst")
    set_role(inst, "bucho", "manager")
    log = inst.audit
    sql = "SELECT block, COUNT(*) FROM residents GROUP BY block"
    req = log.append("query.request", user="tanaka", role="analyst", outcome="ok", summary="received",
                     details={"sql": sql, "fingerprint": "f1"})
    log.append("query", user="tanaka", role="analyst", outcome="ok", summary="answered",
               details={"sql": sql, "request": req["seq"], "epsilon_spent": 0.0})
    lost = log.append("query.request", user="tanaka", role="analyst", outcome="ok", summary="received",
                      details={"sql": "SELECT sex, COUNT(*) FROM residents GROUP BY sex", "fingerprint": "f2"})
    log.append("query.request", user="tanaka", role="analyst", outcome="ok", summary="received",
               details={"sql": "SELECT age, COUNT(*) FROM residents GROUP BY age", "fingerprint": "f3"})
    log.append("query.refused", user="tanaka", role="analyst", outcome="refused", summary="refused: resource_limit",
               details={"sql": "SELECT age, COUNT(*) FROM residents GROUP BY age", "code": "resource_limit"})
    for report in ("01_人口", "01_人口", "06_世帯"):
        log.append("report.view", user="bucho", role="manager", outcome="ok", summary=f"viewed {report}",
                   details={"report": report, "file": "report.html"})
    log.append(DENIAL_TYPE, user="(unauthenticated)", outcome="denied", summary="guard: 4 more",
               details={"count": 4, "aggregated": True, "service": "guard"})
    inst.lost_seq = lost["seq"]
    return inst


class TestAuditPage(AsyncHTTPTestCase):
    inst: Instance

    @pytest.fixture(autouse=True)
    def _bind(self, page_instance):
        self.inst = page_instance

    def get_app(self):
        FixedHubOAuth.known = {"t-admin": model("kansa", "access:services!service=audit", AUDIT_REVIEW_SCOPE)}
        auth = FixedHubOAuth(api_token="unused", api_url="http://127.0.0.1:9/hub/api",
                             oauth_client_id="service-audit", base_url="/services/audit/")
        return make_app("audit", ROUTES, instance=self.inst, prefix="/services/audit/", hub_auth=auth,
                        **app_settings(self.inst, "/services/audit/"))

    def page(self, path=""):
        r = self.fetch("/services/audit/" + path, headers={"Authorization": "token t-admin"}, raise_error=False)
        assert r.code == 200
        return r.body.decode()

    def test_the_full_head_is_shown_and_verify_accepts_it(self):
        head = re.search(r'<code id="head-hash">(\d+):([0-9a-f]{64})</code>', self.page())
        assert head, "the full head hash is not on the page"
        seq, digest = int(head.group(1)), head.group(2)
        assert seq <= self.inst.audit.head()[0]
        ok = subprocess.run([SEKISHO, "audit", "verify", "--home", str(self.inst.home),
                             "--expect-head", f"{seq}:{digest}"], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        forged = digest[:-1] + ("0" if digest[-1] != "0" else "1")
        bad = subprocess.run([SEKISHO, "audit", "verify", "--home", str(self.inst.home),
                              "--expect-head", f"{seq}:{forged}"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1

    def test_requests_without_an_outcome_are_flagged(self):
        page = self.page()
        flagged = re.findall(r'<tr class="unanswered" data-seq="(\d+)"', page)
        assert flagged == [str(self.inst.lost_seq)]
        assert "結果の記録なし" in page

    def test_report_views_and_denials_per_person(self):
        page = self.page("people")
        row = re.search(r'<tr class="person" data-user="bucho">(.*?)</tr>', page, re.S).group(1)
        assert "01_人口（2）" in row and "06_世帯（1）" in row
        anon = re.search(r'<tr class="person" data-user="\(unauthenticated\)">(.*?)</tr>', page, re.S).group(1)
        assert '<td class="num denials">4</td>' in anon


def test_unanswered_requests_and_person_columns_as_folds(page_instance):
    entries = list(page_instance.audit.entries())
    assert [e["seq"] for e in unanswered_requests(entries)] == [page_instance.lost_seq]
    people = {p.user: p for p in person_activity(entries)}
    assert people["bucho"].reports == {"01_人口": 2, "06_世帯": 1}
    assert people["(unauthenticated)"].denials == 4
