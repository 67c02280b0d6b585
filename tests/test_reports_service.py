"""The reports service: who may read, what headers protect the hub, what is audited.

The service runs on loopback with the real HubOAuth client talking to a stand-in for the
hub's ``/hub/api/user`` endpoint (tests/client_fixtures.py); the publication it serves is
written by hand here (publishing itself is tested in test_reports_publish.py).
"""

from __future__ import annotations

import json

import pytest
import requests

from client_fixtures import _LoopThread, hub_api, hub_oauth  # noqa: F401 (hub_api is a fixture)
from sekisho.access import REPORTS_READ_SCOPE, ROLES, capabilities, load_policy_cached
from sekisho.instance import Instance
from sekisho.reports.index import write_index
from sekisho.services.reports import REPORT_CSP, ReportsService
from sekisho.state import set_role

ACCESS = "access:services!service=reports"
READER = [ACCESS, REPORTS_READ_SCOPE]
HTML = "<!doctype html><html><body><h1>人口</h1><script>1</script></body></html>"


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("rsvc") / "home")
    for name, role in (("kanri", "manager"), ("tanaka", "analyst"), ("kansa", "admin"),
                       ("steward1", "steward")):
        set_role(inst, name, role)
    pub = inst.published_dir / "01_人口" / "20261101T000000-1"
    (pub / "tables").mkdir(parents=True)
    (pub / "report.html").write_text(HTML, encoding="utf-8")
    (pub / "tables" / "item01.json").write_text(json.dumps({"rows": [[1]]}), encoding="utf-8")
    (inst.published_dir / "secret.txt").write_text("not a report")
    write_index(inst.published_dir, {"reports": {"01_人口": {
        "title": "人口", "base_month": "2026-10", "published_at": "2026-11-01T09:00:00+09:00",
        "snapshot": "snap-1", "digest": "sha256:00", "dir": "01_人口/20261101T000000-1",
        "parameters": {}, "tables": ["item01"]}}})
    return inst


@pytest.fixture(scope="module")
def service(hub_api, instance):
    tokens = {"tok-manager": ("kanri", READER), "tok-analyst": ("tanaka", READER),
              "tok-admin": ("kansa", READER), "tok-steward": ("steward1", READER),
              "tok-noscope": ("kanri", [ACCESS]), "tok-stranger": ("stranger", READER),
              "tok-guard": ("kanri", ["access:services!service=guard"])}
    for token, (name, scopes) in tokens.items():
        hub_api.add_token(token, name, scopes)
    svc = ReportsService(instance, hub_auth=hub_oauth(hub_api.api_url))
    thread = _LoopThread(svc.make_app).start()
    thread.url = f"http://127.0.0.1:{thread.port}/services/reports/"
    yield thread
    thread.stop()


def get(service, path, token="tok-manager"):
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(service.url + path, headers=headers, timeout=30, allow_redirects=False)


def views(instance, outcome=None):
    return [e for e in instance.audit.entries(type="report.view")
            if outcome is None or e["outcome"] == outcome]


def reader_roles(instance):
    policy = load_policy_cached(instance.policy_path)
    return {role for role in ROLES if capabilities(policy, role).can_read_reports}


def test_reader_roles_come_from_the_policy(instance):
    roles = reader_roles(instance)
    assert "manager" in roles
    assert "steward" not in roles and "reports" not in roles


def test_manager_sees_the_index(service):
    r = get(service, "")
    assert r.status_code == 200
    assert "公開レポート一覧" in r.text and "2026年10月" in r.text and "snap-1" in r.text
    assert "script-src" not in r.headers["Content-Security-Policy"]  # the index runs no scripts
    api = get(service, "api/index").json()
    assert [e["name"] for e in api["reports"]] == ["01_人口"]


def test_report_is_served_sandboxed_and_audited(service, instance):
    before = len(views(instance, "ok"))
    r = get(service, "r/01_人口/")
    assert r.status_code == 200 and r.text == HTML
    csp = r.headers["Content-Security-Policy"]
    assert csp == REPORT_CSP
    directives = {d.strip().split()[0]: d.strip().split()[1:] for d in csp.split(";")}
    # an opaque origin: scripts run, but cannot use the hub's cookies or origin
    assert directives["sandbox"] == ["allow-scripts"]
    assert "allow-same-origin" not in csp
    assert directives["default-src"] == ["'none'"] and "connect-src" not in directives
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    entries = views(instance, "ok")
    assert len(entries) == before + 1
    assert entries[-1]["user"] == "kanri" and entries[-1]["details"]["report"] == "01_人口"
    assert entries[-1]["details"]["digest"] == "sha256:00"


def test_tables_download(service):
    r = get(service, "r/01_人口/tables/item01.json")
    assert r.status_code == 200 and r.json() == {"rows": [[1]]}
    assert "attachment" in r.headers["Content-Disposition"]
    assert r.headers["Content-Security-Policy"] == REPORT_CSP


@pytest.mark.parametrize("token", ["tok-manager", "tok-analyst", "tok-admin"])
def test_readers_by_policy(service, instance, token):
    expected = 200 if {"tok-manager": "manager", "tok-analyst": "analyst",
                       "tok-admin": "admin"}[token] in reader_roles(instance) else 403
    assert get(service, "r/01_人口/", token).status_code == expected


@pytest.mark.parametrize("token,code", [
    ("tok-noscope", "missing_scope"),      # hub access alone is not the reports scope
    ("tok-guard", "missing_scope"),        # a guard token does not open reports
    ("tok-stranger", "no_role"),           # no Sekisho role
    ("tok-steward", "role_not_allowed"),   # a role the policy does not let read reports
])
def test_refused_readers_get_403_and_are_audited(service, instance, token, code):
    before = len(views(instance, "denied"))
    r = get(service, "r/01_人口/", token)
    assert r.status_code == 403 and "人口</h1>" not in r.text
    denied = views(instance, "denied")
    assert len(denied) == before + 1 and denied[-1]["details"]["code"] == code


def test_no_token_gets_no_report(service):
    r = get(service, "r/01_人口/", token=None)
    assert r.status_code in (302, 401, 403) and "人口</h1>" not in r.text


@pytest.mark.parametrize("path", [
    "r/unknown/", "r/01_人口/../secret.txt", "r/01_人口/tables/../../../index.json",
    "r/01_人口/report.ipynb", "r/..%2Fsecret.txt/",
])
def test_only_published_files_are_served(service, path):
    r = get(service, path)
    assert r.status_code in (403, 404) and "not a report" not in r.text
