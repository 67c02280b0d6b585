"""The shared service base (sekisho.services.hubauth) refuses what it must.

These tests run the tornado application in-process with a HubOAuth whose answers
about tokens are fixed (the real hub is exercised in test_hub.py): they pin down the
explicit checks the base performs on top of "the hub knows this token".
"""

from __future__ import annotations

import json

import pytest
import yaml
from tornado.testing import AsyncHTTPTestCase

from hubauth_doubles import FixedHubOAuth
from hubauth_doubles import user_model as user
from sekisho.instance import Instance
from sekisho.services.hubauth import ServiceHandler, make_app
from sekisho.state import set_role

SERVICE = "probe"
ACCESS = f"access:services!service={SERVICE}"


class WhoAmI(ServiceHandler):
    api = True

    def get(self):
        self.write({"name": self.hub_user, "role": self.sekisho_role})

    def post(self):
        self.write({"posted_by": self.hub_user})


class AdminsOnly(ServiceHandler):
    api = True
    required_capability = "can_review_audit"   # the policy gives it to admins
    required_scopes = frozenset({ACCESS, "custom:sekisho:audit-review"})

    def get(self):
        self.write({"ok": True})


class Page(ServiceHandler):
    def get(self):
        self.write("page")


@pytest.fixture(scope="module")
def probe_instance(tmp_path_factory):
    inst = Instance.create(tmp_path_factory.mktemp("hubauth") / "inst")
    set_role(inst, "ana", "analyst")
    set_role(inst, "adm", "admin")
    return inst


@pytest.fixture(autouse=True)
def _bind(request, probe_instance):
    if request.instance is not None:
        request.instance.inst = probe_instance


class TestServiceHandler(AsyncHTTPTestCase):
    inst: Instance

    def get_app(self):
        FixedHubOAuth.known = {
            "t-ana": user("ana", ACCESS),
            "t-ana-custom": user("ana", ACCESS, "custom:sekisho:audit-review"),
            "t-ana-noscope": user("ana", "read:users!user=ana"),
            "t-stranger": user("stranger", ACCESS),
            "t-adm": user("adm", ACCESS, "custom:sekisho:audit-review"),
            "t-adm-nocustom": user("adm", ACCESS),
            "t-service": user("some-service", ACCESS, kind="service"),
            "t-filtered-other": user("ana", "access:services!service=other"),
        }
        auth = FixedHubOAuth(api_token="unused", api_url="http://127.0.0.1:9/hub/api",
                             oauth_client_id=f"service-{SERVICE}", base_url=f"/services/{SERVICE}/")
        return make_app(SERVICE, [("whoami", WhoAmI), ("admins", AdminsOnly), ("page", Page)],
                        instance=self.inst, prefix=f"/services/{SERVICE}/", hub_auth=auth)

    def call(self, path, token=None, method="GET", body=None):
        headers = {"Authorization": f"token {token}"} if token else {}
        return self.fetch(f"/services/{SERVICE}/{path}", method=method, headers=headers, body=body,
                          follow_redirects=False, raise_error=False)

    def test_known_token_with_access_scope_gets_name_and_role(self):
        r = self.call("whoami", "t-ana")
        assert r.code == 200
        assert json.loads(r.body) == {"name": "ana", "role": "analyst"}

    def test_no_token_is_401_json_not_a_redirect(self):
        r = self.call("whoami")
        assert r.code == 401
        assert json.loads(r.body)["message_ja"]

    def test_unknown_token_is_401(self):
        assert self.call("whoami", "t-forged").code == 401

    def test_token_without_the_service_scope_is_403(self):
        # the hub knows the token, but it was not granted access to this service
        assert self.call("whoami", "t-ana-noscope").code == 403
        assert self.call("whoami", "t-filtered-other").code == 403

    def test_person_without_a_sekisho_role_is_403(self):
        r = self.call("whoami", "t-stranger")
        assert r.code == 403
        assert "no_role" in json.loads(r.body)["message"]

    def test_services_are_not_people(self):
        assert self.call("whoami", "t-service").code == 403

    def test_role_restriction(self):
        assert self.call("admins", "t-ana").code == 403
        assert self.call("admins", "t-adm").code == 200

    def test_a_policy_change_takes_effect_at_the_next_request(self):
        # the capability is read from the policy in force at each request (no restart)
        path = self.inst.policy_path
        original = path.read_text(encoding="utf-8")
        policy = yaml.safe_load(original)
        policy["roles"]["analyst"]["can_review_audit"] = True
        try:
            assert self.call("admins", "t-ana-custom").code == 403
            path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False), encoding="utf-8")
            assert self.call("admins", "t-ana-custom").code == 200
        finally:
            path.write_text(original, encoding="utf-8")
        assert self.call("admins", "t-ana-custom").code == 403

    def test_custom_scope_is_checked_even_for_the_right_role(self):
        assert self.call("admins", "t-adm-nocustom").code == 403

    def test_token_post_needs_no_xsrf_but_anonymous_post_is_refused(self):
        assert self.call("whoami", "t-ana", method="POST", body="{}").code == 200
        assert self.call("whoami", None, method="POST", body="{}").code in (401, 403)

    def test_browser_without_login_is_sent_to_the_hub_oauth(self):
        r = self.call("page")
        assert r.code == 302
        assert "/hub/api/oauth2/authorize" in r.headers["Location"]
        assert "client_id=service-probe" in r.headers["Location"]
