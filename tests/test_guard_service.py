"""The guard service's HTTP layer: authentication, authorization, validation, encoding.

The service runs on loopback with the real HubOAuth client talking to a stand-in for the
hub's ``/hub/api/user`` endpoint, and a test double for the guard (tests/client_fixtures.py).
End-to-end behaviour with the real guard and a real hub is in test_guard_service_e2e.py
and test_client_hub.py.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pytest
import requests

from sekisho.instance import Instance
from sekisho.protocol import ARROW_STREAM, SUMMARY_HEADER, QueryRequest
from sekisho.services import guard as guard_service
from sekisho.services.guard import GuardService
from sekisho.state import set_role
from client_fixtures import (GUARD_SCOPE, FakeRefused, GuardDouble, ServiceThread, hub_api,  # noqa: F401
                                   hub_oauth, json_body)

GOOD = "tok-analyst-0001"


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("svc") / "home")
    set_role(inst, "tanaka", "analyst")
    set_role(inst, "suzuki", "analyst")
    set_role(inst, "kanri", "manager")
    return inst


@pytest.fixture(scope="module")
def service(hub_api, instance):
    hub_api.add_token(GOOD, "tanaka", [GUARD_SCOPE, "read:users!user=tanaka"])
    hub_api.add_token("tok-noscope-0001", "suzuki", ["access:servers!server=suzuki/"])
    hub_api.add_token("tok-other-service", "suzuki", ["access:services!service=audit"])
    hub_api.add_token("tok-manager-0001", "kanri", [GUARD_SCOPE])
    hub_api.add_token("tok-stranger-001", "stranger", [GUARD_SCOPE])
    hub_api.add_token("tok-service-0001", "reports", [GUARD_SCOPE], kind="service")
    hub_api.add_token("tok-allsvc-00001", "suzuki", ["access:services"])
    svc = GuardService(instance, hub_auth=hub_oauth(hub_api.api_url), guard_factory=GuardDouble,
                       refusal_types=(FakeRefused,), workers=4)
    thread = ServiceThread(svc).start()
    yield thread
    thread.stop()
    svc.pool.shutdown()


def call(service, method, path, token=GOOD, **kwargs):
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"token {token}"
    return requests.request(method, service.url + path, headers=headers, timeout=30, **kwargs)


def denials(instance, code=None):
    return [e for e in instance.audit.entries(type="query.refused")
            if e["outcome"] == "denied" and (code is None or e["details"]["code"] == code)]


# ---- authentication and authorization ----------------------------------------

def test_views_and_budget_for_an_analyst(service):
    r = call(service, "GET", "api/views")
    assert r.status_code == 200
    body = json_body(r)
    assert body["user"] == "tanaka" and body["role"] == "analyst"
    assert "residents" in body["views"]
    b = json_body(call(service, "GET", "api/budget"))
    assert b["remaining"] == 8.5 and b["user"] == "tanaka"


def test_no_token_is_401_and_returns_no_data(service):
    r = call(service, "POST", "api/query", token=None, json={"sql": "SELECT 1"})
    assert r.status_code in (401, 403)
    assert json_body(r)["code"] in ("unauthenticated", "forbidden")
    r = call(service, "GET", "api/views", token=None)
    assert r.status_code == 401 and "views" not in json_body(r)


@pytest.mark.parametrize("token,code", [
    ("forged-token-123456", "invalid_token"),
    ("tok-noscope-0001", "missing_scope"),        # a valid token of a user, without guard access
    ("tok-other-service", "missing_scope"),       # access to another service is not access here
    ("tok-manager-0001", "role_not_allowed"),     # a role without views
    ("tok-stranger-001", "no_role"),              # hub user who is not a Sekisho user
    ("tok-service-0001", "not_a_person"),         # a service's token
])
def test_refused_tokens_are_403_audited_and_get_no_data(service, instance, token, code):
    before = len(denials(instance, code))
    for method, path, payload in (("POST", "api/query", {"sql": "SELECT block, count(*) FROM residents GROUP BY 1"}),
                                  ("GET", "api/views", None), ("GET", "api/budget", None),
                                  ("POST", "api/describe", {"sql": "SELECT 1"})):
        r = call(service, method, path, token=token, json=payload)
        assert r.status_code == 403, (path, r.text)
        body = json_body(r)
        assert body["code"] == code
        assert set(body) == {"code", "reason", "part"}
        assert "北部" not in r.text and "views" not in body
    assert len(denials(instance, code)) == before + 4


def test_token_in_the_url_is_not_accepted(service):
    # tokens in URLs end up in logs and browser history; the API takes them in the header only
    r = requests.get(service.url + f"api/views?token={GOOD}", timeout=30)
    assert r.status_code == 401 and "views" not in json_body(r)


def test_wildcard_service_scope_is_accepted(service):
    # access:services (all services) includes the guard; the explicit check resolves filters
    assert call(service, "GET", "api/budget", token="tok-allsvc-00001").status_code == 200


@pytest.mark.parametrize("header", ["token", "token \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9",
                                    "Basic dXNlcjpwYXNz", "token a b c", "token " + "x" * 600])
def test_malformed_authorization_headers_are_403_without_asking_the_hub(service, hub_api, header):
    calls = hub_api.calls
    r = requests.get(service.url + "api/views", headers={"Authorization": header.encode("latin-1")},
                     timeout=30)
    assert r.status_code == 403 and json_body(r)["code"] == "invalid_token"
    assert hub_api.calls == calls


def test_denial_audit_entries_chain_verifies(service, instance):
    call(service, "GET", "api/views", token="forged-token-999999")
    assert instance.audit.verify().ok


# ---- queries -----------------------------------------------------------------

SQL = "SELECT block, count(*) AS n FROM residents GROUP BY block"


def test_query_arrow_carries_summary_in_metadata_and_header(service):
    r = call(service, "POST", "api/query", json={"sql": SQL})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(ARROW_STREAM)
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.column_names == ["block", "n"]
    summary = json.loads(table.schema.metadata[b"sekisho.summary"].decode())
    assert summary["notes_ja"] == "1 セルを秘匿しました"
    assert json.loads(r.headers[SUMMARY_HEADER]) == summary


def test_query_json_format(service):
    r = call(service, "POST", "api/query", json={"sql": SQL, "format": "json", "mode": "dp", "epsilon": 0.5})
    assert r.status_code == 200
    body = json_body(r)
    assert body["rows"] == [["北部", 120], ["中部", None]]
    assert [c["name"] for c in body["columns"]] == ["block", "n"]
    assert body["columns"][1]["type"] == "int64"
    assert body["summary"]["mode"] == "dp" and body["summary"]["epsilon_spent"] == 0.5


def test_refusal_is_422_with_code_reason_part(service):
    r = call(service, "POST", "api/query", json={"sql": "SELECT * FROM residents"})
    assert r.status_code == 422
    assert json_body(r) == {"code": "row_level_output",
                            "reason": "row-level output is not allowed / 個票は出せません",
                            "part": "SELECT *"}


def test_guard_failure_is_500_without_details(service, caplog):
    with caplog.at_level(logging.ERROR, logger="sekisho.services.guard"):
        r = call(service, "POST", "api/query", json={"sql": "SELECT boom FROM residents"})
    assert r.status_code == 500
    assert json_body(r)["code"] == "internal_error" and "guard bug" not in r.text
    # the bug is in the service log, with its traceback
    (record,) = [rec for rec in caplog.records if rec.name == "sekisho.services.guard"]
    assert record.exc_info and "guard bug" in str(record.exc_info[1]) and "guard.query" in record.getMessage()


def test_an_answer_that_cannot_be_encoded_is_logged_with_its_audit_seq(service, caplog, monkeypatch):
    def broken(table, summary):
        raise ValueError("encoder bug")

    monkeypatch.setattr(guard_service, "arrow_stream", broken)
    with caplog.at_level(logging.ERROR, logger="sekisho.services.guard"):
        r = call(service, "POST", "api/query", json={"sql": SQL})
    assert r.status_code == 500 and json_body(r)["code"] == "internal_error"
    assert SUMMARY_HEADER not in r.headers and "encoder bug" not in r.text
    (record,) = [rec for rec in caplog.records if rec.name == "sekisho.services.guard"]
    assert record.exc_info and "audit seq 7" in record.getMessage()   # GuardDouble's query_id


def test_describe(service):
    r = call(service, "POST", "api/describe", json={"sql": SQL})
    assert r.status_code == 200
    assert [c["type"] for c in json_body(r)["columns"]] == ["string", "int64"]


# Malformed envelopes only: the values (an empty or overlong SQL, an unknown mode, a
# negative ε) are the guard's to judge, once for every entry point (test_guard_service_e2e.py)
@pytest.mark.parametrize("body,part", [
    (b"", None), (b"not json", None), (b"[1, 2]", None), (b"\xff\xfe", None),
    (json.dumps({}).encode(), "sql"),
    (json.dumps({"sql": 5}).encode(), "sql"),
    (json.dumps({"sql": SQL, "mode": 3}).encode(), "mode"),
    (json.dumps({"sql": SQL, "mode": "dp", "epsilon": "1"}).encode(), "epsilon"),
    (json.dumps({"sql": SQL, "mode": "dp", "epsilon": True}).encode(), "epsilon"),
    (json.dumps({"sql": SQL, "format": "csv"}).encode(), "format"),
    (json.dumps({"sql": SQL, "user": "suzuki"}).encode(), "user"),   # cannot act as someone else
])
def test_bad_requests_are_400_naming_the_key(service, body, part):
    r = call(service, "POST", "api/query", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = json_body(r)
    assert err["code"] == "bad_request" and err["part"] == part and err["reason"]


def test_oversized_body_is_refused_not_5xx(service):
    # tornado answers 400 and closes while the client may still be sending: either is fine
    try:
        r = call(service, "POST", "api/query", data=b"{" + b" " * 3_000_000 + b"}")
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        return
    assert 400 <= r.status_code < 500


def test_wrong_method_and_unknown_path(service):
    assert call(service, "GET", "api/query").status_code == 405
    assert call(service, "GET", "api/nothing").status_code == 404


def test_concurrent_requests_are_served(service):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return call(service, "POST", "api/query", json={"sql": SQL, "format": "json"}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64


def test_parse_query_request_defaults():
    req = QueryRequest.from_body(b'{"sql": "SELECT 1"}')
    assert req.mode is None and req.epsilon is None and req.format == "arrow"


def test_a_query_whose_client_has_gone_is_cancelled(service):
    """The client gives up (its timeout, a stopped kernel): the connection closes and the
    service cancels the query (``Guard.query(..., cancel=...)``) instead of letting it hold
    a worker thread until its deadline."""
    guard = service.service.pool.guard()
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(service.url + "api/query", json={"sql": "SELECT slow FROM residents"},
                      headers={"Authorization": f"token {GOOD}"}, timeout=0.5)
    deadline = time.monotonic() + 10
    while not any(c[0] in ("cancelled", "ran") for c in guard.calls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("cancelled", "SELECT slow FROM residents") in guard.calls
    assert call(service, "POST", "api/query", json={"sql": SQL}).status_code == 200   # the service goes on
