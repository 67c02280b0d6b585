"""The audit review service, in-process (the real hub and browser: test_audit_review_browser.py).

A HubOAuth whose answers about tokens are fixed stands in for the hub; the service's
own checks (scopes, role), its pages, CSV export, the auditing of every read and the
alert acknowledgement run for real against a real instance and audit trail.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timedelta

import pytest
from tornado.testing import AsyncHTTPTestCase

from hubauth_doubles import FixedHubOAuth
from hubauth_doubles import user_model as model
from sekisho.instance import TOKYO, Instance
from sekisho.services.audit_review import (
    ROUTES,
    FilterError,
    Filters,
    app_settings,
    open_alerts,
    parse_filters,
    person_activity,
)
from sekisho.access import AUDIT_REVIEW_SCOPE
from sekisho.services.hubauth import make_app
from sekisho.state import set_role

PREFIX = "/services/audit/"
ACCESS = "access:services!service=audit"


@pytest.fixture(scope="module")
def review_instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("audit-review") / "inst")
    for name, role in (("kansa", "admin"), ("tanaka", "analyst"), ("bucho", "manager")):
        set_role(inst, name, role)
    log = inst.audit
    log.append("login", user="tanaka", role="analyst", outcome="ok", summary="tanaka logged in",
               details={"remote_ip": "10.0.0.5"})
    log.append("server.start", user="tanaka", role="analyst", outcome="ok", summary="server started",
               details={"pid": 1})
    log.append("query", user="tanaka", role="analyst", outcome="ok", summary="dp query",
               details={"sql": "SELECT block, COUNT(*) FROM residents GROUP BY block", "mode": "dp",
                        "decision": "allowed", "epsilon_spent": 0.5, "views": ["residents"]})
    log.append("query", user="tanaka", role="analyst", outcome="ok", summary="dp query",
               details={"sql": "SELECT sex, COUNT(*) FROM residents GROUP BY sex", "mode": "dp",
                        "decision": "allowed", "epsilon_spent": 0.25, "views": ["residents"]})
    log.append("query.refused", user="tanaka", role="analyst", outcome="refused", summary="refused: row_level_output",
               details={"sql": "SELECT * FROM residents", "code": "row_level_output", "decision": "refused",
                        "epsilon_spent": 0.0})
    log.append("alert", user="tanaka", role="analyst", outcome="ok", summary="guard alert: refusal_burst",
               details={"alert": "refusal_burst"})
    log.append("login.failed", user="suzuki", outcome="denied", summary="failed login",
               details={"reason": "bad_credentials"})
    log.append("server.stop", user="tanaka", role="analyst", outcome="ok", summary="server stopped", details={})
    log.append("logout", user="tanaka", role="analyst", outcome="ok", summary="tanaka logged out", details={})
    return inst


@pytest.fixture(autouse=True)
def _bind(request, review_instance):
    if request.instance is not None:
        request.instance.inst = review_instance


class TestAuditReviewService(AsyncHTTPTestCase):
    inst: Instance

    def get_app(self):
        FixedHubOAuth.known = {
            "t-admin": model("kansa", ACCESS, AUDIT_REVIEW_SCOPE),
            "t-admin-nocustom": model("kansa", ACCESS),
            "t-analyst": model("tanaka", ACCESS, AUDIT_REVIEW_SCOPE),  # even with scopes: wrong role
            "t-manager": model("bucho", ACCESS),
        }
        auth = FixedHubOAuth(api_token="unused", api_url="http://127.0.0.1:9/hub/api",
                             oauth_client_id="service-audit", base_url=PREFIX)
        return make_app("audit", ROUTES, instance=self.inst, prefix=PREFIX, hub_auth=auth,
                        **app_settings(self.inst, PREFIX))

    def get(self, path, token):
        return self.fetch(PREFIX + path, headers={"Authorization": f"token {token}"}, raise_error=False,
                          follow_redirects=False)

    def reads(self):
        return [e for e in self.inst.audit.entries(type="audit.read")]

    def test_admin_sees_events_chain_status_and_open_alerts(self):
        r = self.get("", "t-admin")
        assert r.code == 200
        page = r.body.decode()
        assert "ハッシュチェーン検証: 正常" in page
        assert "SELECT block, COUNT(*) FROM residents GROUP BY block" in page
        assert "guard alert: refusal_burst" in page
        assert "ログイン失敗" in page

    def test_each_read_is_audited_with_its_filters(self):
        before = len(self.reads())
        assert self.get("?user=tanaka&type=query", "t-admin").code == 200
        reads = self.reads()
        assert len(reads) == before + 1
        last = reads[-1]
        assert last["user"] == "kansa" and last["role"] == "admin" and last["outcome"] == "ok"
        assert last["details"]["filters"]["user"] == "tanaka"
        assert last["details"]["filters"]["type"] == "query"

    def test_filters_narrow_the_events(self):
        page = self.get("?type=query.refused", "t-admin").body.decode()
        assert "SELECT * FROM residents" in page
        assert "GROUP BY sex" not in page
        page = self.get("?outcome=denied&type=login.failed", "t-admin").body.decode()
        assert "suzuki" in page and "GROUP BY block" not in page

    def test_bad_filter_is_a_400_that_names_the_parameter(self):
        r = self.get("?since=2026-13-01", "t-admin")
        assert r.code == 400
        assert "since" in r.body.decode()

    def test_analyst_and_manager_are_refused_and_the_refusal_is_audited(self):
        before = len(self.reads())
        assert self.get("", "t-analyst").code == 403
        assert self.get("", "t-manager").code == 403
        denied = [e for e in self.reads()[before:] if e["outcome"] == "denied"]
        assert {e["user"] for e in denied} == {"tanaka", "bucho"}

    def test_admin_role_without_the_review_scope_is_refused(self):
        assert self.get("", "t-admin-nocustom").code == 403

    def test_csv_export_has_every_matching_entry(self):
        r = self.get("export.csv?user=tanaka", "t-admin")
        assert r.code == 200
        assert r.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.body.decode("utf-8-sig"))))
        assert rows and all(row["user"] == "tanaka" for row in rows)
        assert {"query", "query.refused", "login", "logout"} <= {row["type"] for row in rows}
        assert self.reads()[-1]["details"]["format"] == "csv"

    def test_people_page_summarises_sessions_queries_refusals_and_epsilon(self):
        page = self.get("people", "t-admin").body.decode()
        assert 'data-user="tanaka"' in page
        assert "0.750" in page  # 0.5 + 0.25

    def test_analysts_on_hold_are_listed(self):
        from sekisho.guard import alerts

        assert "照会停止中の利用者はいません" in self.get("", "t-admin").body.decode()
        alerts.put_hold(self.inst, "tanaka", alert="decomposition", raised_by=3)
        try:
            page = self.get("", "t-admin").body.decode()
            assert "照会停止中の利用者（1 人）" in page
            assert '<tr class="hold" data-user="tanaka">' in page and "decomposition" in page
            assert "sekisho users resume" in page
        finally:
            alerts.resume(self.inst, "tanaka")

    def test_acknowledging_an_alert_closes_it_and_is_audited(self):
        alert = self.inst.audit.append("alert", user="tanaka", role="analyst", outcome="ok",
                                       summary="guard alert: near_duplicate_burst", details={"alert": "x"})
        open_before = len(open_alerts(self.inst.audit.entries()))
        # a token-authenticated POST needs no xsrf form field
        r = self.fetch(f"{PREFIX}alerts/{alert['seq']}/ack", method="POST", body="note=checked",
                       headers={"Authorization": "token t-admin"}, follow_redirects=False, raise_error=False)
        assert r.code == 302
        acks = [e for e in self.inst.audit.entries(type="alert.ack")]
        assert acks[-1]["details"]["alert_seq"] == alert["seq"]
        assert acks[-1]["user"] == "kansa"
        assert len(open_alerts(self.inst.audit.entries())) == open_before - 1
        assert f"未確認の警告（{open_before - 1} 件）" in self.get("", "t-admin").body.decode()
        # acknowledging is for reviewers only
        r = self.fetch(f"{PREFIX}alerts/{alert['seq']}/ack", method="POST", body="note=x",
                       headers={"Authorization": "token t-analyst"}, raise_error=False)
        assert r.code == 403


def test_parse_filters_names_the_bad_parameter():
    assert parse_filters({"user": "tanaka", "since": "2026-11-01"}).since == date(2026, 11, 1)
    assert parse_filters({"user": "(empty)"}).user == "(empty)"  # failed logins record what was typed
    for args, param in (({"user": "a\x01b"}, "user"), ({"user": "x" * 65}, "user"), ({"type": "Query;DROP"}, "type"),
                        ({"outcome": "maybe"}, "outcome"), ({"until": "yesterday"}, "until"),
                        ({"since": "2026-11-02", "until": "2026-11-01"}, "since"), ({"limit": "0"}, "limit")):
        with pytest.raises(FilterError) as err:
            parse_filters(args)
        assert err.value.param == param


def _entry(seq, type, user, minutes, outcome="ok", **details):
    ts = (datetime(2026, 11, 2, 9, 0, tzinfo=TOKYO) + timedelta(minutes=minutes)).isoformat()
    return {"seq": seq, "ts": ts, "type": type, "user": user, "role": "analyst", "outcome": outcome,
            "details": details}


def test_person_activity_pairs_logins_with_logouts():
    entries = [
        _entry(1, "login", "a", 0), _entry(2, "server.start", "a", 1),
        _entry(3, "query", "a", 5, epsilon_spent=0.1, views=["residents"]),
        _entry(4, "query.refused", "a", 6, outcome="refused"),
        _entry(5, "server.stop", "a", 50), _entry(6, "logout", "a", 61),
        _entry(7, "login", "a", 120), _entry(8, "login.failed", "b", 121, outcome="denied"),
    ]
    people = {p.user: p for p in person_activity(entries)}
    a = people["a"]
    assert [s.duration for s in a.logins] == [timedelta(minutes=61), None]  # the second is still open
    assert a.servers[0].duration == timedelta(minutes=49)
    assert (a.queries, a.refusals, round(a.epsilon_spent, 3)) == (1, 1, 0.1)
    assert people["b"].failed_logins == 1


def test_open_alerts_excludes_acknowledged_ones():
    entries = [_entry(1, "alert", "a", 0), _entry(2, "alert", "a", 1), _entry(3, "alert.ack", "k", 2, alert_seq=1)]
    assert [a["seq"] for a in open_alerts(entries)] == [2]


def test_filters_round_trip_to_a_query_string():
    f = Filters(user="tanaka", type="query", since=date(2026, 11, 1))
    assert parse_filters(dict(p.split("=") for p in f.query_string().split("&"))) == f
    assert json.dumps(f.as_dict())
