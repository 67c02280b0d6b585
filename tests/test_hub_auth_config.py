"""Hub configuration without a running hub: roles from the policy, and the production
identity-provider examples (hub/auth_*.py) with their group -> role mapping.

The example files are loaded exactly as JupyterHub loads them (traitlets'
PyFileConfigLoader, through ``hub/jupyterhub_config.py``'s ``load_subconfig``), then the
configured authenticator is asked to log people in with auth models shaped like the
ones ldapauthenticator / OAuthenticator produce (their network calls replaced).
"""

from __future__ import annotations

import asyncio

import pytest
import yaml
from traitlets.config import Config, PyFileConfigLoader

from sekisho.access import human_capabilities
from sekisho.hub.config import HubConfigError, hub_settings
from sekisho.hub.roles import BASE_USER_SCOPES, hub_roles, role_from_groups, server_token_scopes
from sekisho.instance import Instance, secure
from sekisho.policy import load_policy
from sekisho.resources import resource_dir
from sekisho.state import role_of, set_role

HUB_DIR = resource_dir("hub")
ALL_SERVICES = ["guard", "audit", "reports"]


@pytest.fixture(scope="module")
def caps():
    return human_capabilities(load_policy(resource_dir("policies") / "himeji.yaml"))


@pytest.fixture
def instance(tmp_path):
    return Instance.create(tmp_path / "inst")


def set_hub_config(inst: Instance, **hub) -> Instance:
    config = yaml.safe_load(inst.config_path.read_text())
    config["hub"] = hub
    inst.config_path.write_text(yaml.safe_dump(config))
    secure(inst.config_path)
    return Instance.open(inst.home)


# ---- roles and scopes from the policy ------------------------------------------------------

def test_roles_follow_the_policys_capabilities(caps):
    roles = {r["name"]: r for r in hub_roles(caps, ALL_SERVICES)}
    assert roles["user"]["scopes"] == list(BASE_USER_SCOPES)
    assert set(roles["sekisho-analyst"]["scopes"]) == {
        "servers!user", "access:servers!user", "access:services!service=guard",
        "access:services!service=reports", "custom:sekisho:reports-read"}
    assert set(roles["sekisho-admin"]["scopes"]) == {
        "access:services!service=audit", "custom:sekisho:audit-review",
        "access:services!service=reports", "custom:sekisho:reports-read"}
    assert set(roles["sekisho-manager"]["scopes"]) == {
        "access:services!service=reports", "custom:sekisho:reports-read"}
    assert roles["sekisho-steward"]["scopes"] == []
    assert roles["sekisho-analyst"]["groups"] == ["analysts"]
    assert roles["sekisho-admin"]["groups"] == ["admins"]


def test_nobody_holds_the_hub_admin_role_or_server_rights_by_default(caps):
    roles = hub_roles(caps, ALL_SERVICES)
    admin = next(r for r in roles if r["name"] == "admin")
    assert admin["users"] == [] and admin["groups"] == [] and admin["services"] == []
    for role in roles:
        if role["name"] not in ("sekisho-analyst", "admin"):
            assert not any(s.startswith(("servers", "access:servers", "admin", "shares"))
                           for s in role.get("scopes", [])), role


def test_service_scopes_only_for_services_that_run(caps):
    roles = {r["name"]: r for r in hub_roles(caps, ["audit"])}
    assert "access:services!service=guard" not in roles["sekisho-analyst"]["scopes"]
    assert "access:services!service=audit" in roles["sekisho-admin"]["scopes"]


def test_server_token_requests_the_server_defaults_and_the_guard():
    assert server_token_scopes() == ["users:activity!user", "access:servers!server",
                                     "access:services!service=guard"]


def test_role_from_groups_refuses_ambiguity_and_unknown_roles():
    mapping = {"g-ana": "analyst", "g-adm": "admin", "g-ana2": "analyst"}
    assert role_from_groups(["g-ana", "other"], mapping) == "analyst"
    assert role_from_groups(["g-ana", "g-ana2"], mapping) == "analyst"
    assert role_from_groups(["g-ana", "g-adm"], mapping) is None   # two roles: refused
    assert role_from_groups([], mapping) is None
    with pytest.raises(ValueError, match="superuser"):
        role_from_groups(["x"], {"x": "superuser"})


# ---- the hub config file ---------------------------------------------------------------------

def load_hub_config(inst: Instance, monkeypatch) -> Config:
    monkeypatch.setenv("SEKISHO_HOME", str(inst.home))
    return PyFileConfigLoader("jupyterhub_config.py", path=str(HUB_DIR)).load_config()


def test_jupyterhub_config_is_driven_by_the_instance(instance, monkeypatch):
    inst = set_hub_config(instance, port=8123, hub_port=8124, proxy_api_port=8125, services=["audit"],
                          service_ports={"audit": 8126})
    cfg = load_hub_config(inst, monkeypatch)
    assert cfg.JupyterHub.bind_url == "http://127.0.0.1:8123/"
    assert cfg.JupyterHub.hub_ip == "127.0.0.1" and cfg.JupyterHub.hub_port == 8124
    assert [s["name"] for s in cfg.JupyterHub.services] == ["audit"]
    audit = cfg.JupyterHub.services[0]
    assert audit["user"] == "sekisho" and audit["url"] == "http://127.0.0.1:8126"
    assert audit["command"][-2:] == ["-m", "sekisho.services.audit_review"]
    assert audit["environment"]["SEKISHO_HOME"] == str(inst.home)
    assert cfg.JupyterHub.authenticator_class.__name__ == "SekishoPAMAuthenticator"
    assert cfg.Spawner.env_keep == []
    if (resource_dir("kernels") / "sekisho" / "kernel.json").exists():
        assert cfg.Spawner.args == ["--MappingKernelManager.default_kernel_name=sekisho"]
        assert cfg.Spawner.environment["JUPYTER_PATH"] == str(resource_dir("kernels").parent)
    assert cfg.Authenticator.admin_users == set()


def test_bad_hub_settings_are_named(instance):
    with pytest.raises(HubConfigError, match="hub: unknown key"):
        hub_settings(set_hub_config(instance, prot=8000))
    with pytest.raises(HubConfigError, match="hub.services"):
        hub_settings(set_hub_config(instance, services=["guard", "shell"]))
    with pytest.raises(HubConfigError, match="integers"):
        hub_settings(set_hub_config(instance, port="eight thousand"))


# ---- production identity providers --------------------------------------------------------------

SECRETS = {"SEKISHO_LDAP_BIND_PASSWORD": "bind-pw", "SEKISHO_OIDC_CLIENT_SECRET": "oidc-secret",
           "SEKISHO_AZUREAD_CLIENT_SECRET": "azure-secret"}


def authenticator_from(example: str, inst: Instance, monkeypatch):
    """Load hub/jupyterhub_config.py with hub.auth_config = the example; build its authenticator."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    inst = set_hub_config(inst, services=[], auth_config=str(HUB_DIR / example))
    cfg = load_hub_config(inst, monkeypatch)
    cls = cfg.JupyterHub.authenticator_class
    return cls(config=cfg)


LDAP_ANALYSTS = "CN=sekisho-analysts,OU=Groups,DC=city,DC=himeji,DC=example"
LDAP_AUDITORS = "CN=sekisho-auditors,OU=Groups,DC=city,DC=himeji,DC=example"


def ldap_model(name, *groups):
    return {"name": name, "auth_state": {"ldap_groups": list(groups), "user_attributes": {"memberOf": []}}}


def fake_authenticate(monkeypatch, cls, model):
    async def authenticate(self, handler, data):
        return model(data["username"]) if callable(model) else model
    monkeypatch.setattr(cls, "authenticate", authenticate)


def login(auth, name):
    return asyncio.run(auth.get_authenticated_user(None, {"username": name, "password": "x"}))


def test_ldap_example_maps_directory_groups_to_roles(instance, monkeypatch):
    from ldapauthenticator import LDAPAuthenticator

    auth = authenticator_from("auth_ldap.py", instance, monkeypatch)
    assert type(auth).__name__ == "SekishoLDAPAuthenticator"
    assert auth.role_source == "groups"
    assert auth.lookup_dn_search_password == "bind-pw"
    assert set(auth.allowed_groups) == set(auth.group_roles)  # membership is looked up for each
    assert auth.sekisho_role_for("tanaka", ldap_model("tanaka", LDAP_ANALYSTS)) == "analyst"
    assert auth.sekisho_role_for("sato", ldap_model("sato", LDAP_AUDITORS)) == "admin"
    assert auth.sekisho_role_for("kato", ldap_model("kato")) is None
    assert auth.sekisho_role_for("both", ldap_model("both", LDAP_ANALYSTS, LDAP_AUDITORS)) is None

    # a whole login: the hub group is the role's, the registry follows, all of it audited
    groups = {"tanaka": [LDAP_ANALYSTS], "both": [LDAP_ANALYSTS, LDAP_AUDITORS]}
    fake_authenticate(monkeypatch, LDAPAuthenticator, lambda name: ldap_model(name, *groups.get(name, [])))
    inst = auth.instance
    result = login(auth, "tanaka")
    assert result["groups"] == ["analysts"] and result["admin"] is False
    assert role_of(inst, "tanaka") == "analyst"
    assert login(auth, "both") is None and role_of(inst, "both") is None
    kinds = [(e["type"], e["user"], e["outcome"]) for e in inst.audit.entries() if e["type"] != "instance.init"]
    assert kinds == [("users.set-role", "tanaka", "ok"), ("login", "tanaka", "ok"),
                     ("login.failed", "both", "denied")]
    assert list(inst.audit.entries(type="login.failed"))[0]["details"]["reason"] == "no_sekisho_role"


def test_oidc_example_maps_provider_groups_to_roles(instance, monkeypatch):
    auth = authenticator_from("auth_oidc.py", instance, monkeypatch)
    assert type(auth).__name__ == "SekishoGenericOAuthenticator"
    assert auth.manage_groups and auth.client_secret == "oidc-secret"

    async def groups_of(groups):
        model = {"name": "tanaka", "admin": None, "auth_state": {"oauth_user": {"groups": groups}}}
        return await auth._apply_managed_groups(model)  # OAuthenticator's own claim handling

    model = asyncio.run(groups_of(["/sekisho/analysts", "/all-staff"]))
    assert auth.sekisho_role_for("tanaka", model) == "analyst"
    model = asyncio.run(groups_of(["/sekisho/managers"]))
    assert auth.sekisho_role_for("tanaka", model) == "manager"
    model = asyncio.run(groups_of(["/all-staff"]))
    assert auth.sekisho_role_for("tanaka", model) is None
    assert not auth.check_allowed("tanaka", model)


def test_azuread_example_maps_security_groups_to_roles(instance, monkeypatch):
    auth = authenticator_from("auth_azuread.py", instance, monkeypatch)
    assert type(auth).__name__ == "SekishoAzureAdOAuthenticator"
    assert auth.user_info_to_username({"preferred_username": "Tanaka.Taro@city.himeji.example.lg.jp"}) == "tanaka.taro"

    async def groups_of(groups):
        model = {"name": "tanaka.taro", "admin": None, "auth_state": {"user": {"groups": groups}}}
        return await auth._apply_managed_groups(model)

    assert auth.sekisho_role_for("tanaka.taro", asyncio.run(groups_of(
        ["6f1c2a9e-0000-4000-8000-00000000a002"]))) == "admin"
    assert auth.sekisho_role_for("tanaka.taro", asyncio.run(groups_of(
        ["6f1c2a9e-0000-4000-8000-00000000a001", "6f1c2a9e-0000-4000-8000-00000000a002"]))) is None


def test_missing_idp_secret_is_a_clear_error(instance, monkeypatch):
    monkeypatch.delenv("SEKISHO_OIDC_CLIENT_SECRET", raising=False)
    inst = set_hub_config(instance, services=[], auth_config=str(HUB_DIR / "auth_oidc.py"))
    with pytest.raises(RuntimeError, match="SEKISHO_OIDC_CLIENT_SECRET"):
        load_hub_config(inst, monkeypatch)


# ---- PAM: the registry decides --------------------------------------------------------------------

def test_pam_login_needs_a_registered_role_and_is_audited(instance, monkeypatch):
    from jupyterhub.auth import PAMAuthenticator

    from sekisho.hub.auth import SekishoPAMAuthenticator

    set_role(instance, "tanaka", "analyst")
    auth = SekishoPAMAuthenticator(sekisho_home=str(instance.home))
    passwords = {"tanaka": "right", "yamada": "right"}  # yamada has an OS account but no role

    async def pam(self, handler, data):
        return data["username"] if passwords.get(data["username"]) == data["password"] else None
    monkeypatch.setattr(PAMAuthenticator, "authenticate", pam)

    ok = asyncio.run(auth.get_authenticated_user(None, {"username": "tanaka", "password": "right"}))
    assert ok["groups"] == ["analysts"]
    assert asyncio.run(auth.get_authenticated_user(None, {"username": "tanaka", "password": "wrong"})) is None
    assert asyncio.run(auth.get_authenticated_user(None, {"username": "yamada", "password": "right"})) is None
    events = [(e["type"], e["user"], e["details"].get("reason")) for e in instance.audit.entries()
              if e["type"].startswith("login")]
    assert events == [("login", "tanaka", None), ("login.failed", "tanaka", "bad_credentials"),
                      ("login.failed", "yamada", "no_sekisho_role")]
    assert "wrong" not in instance.audit.path.read_text()


def test_login_is_refused_when_the_audit_trail_cannot_be_written(instance, monkeypatch):
    from jupyterhub.auth import PAMAuthenticator

    from sekisho.audit import AuditError, AuditLog
    from sekisho.hub.auth import SekishoPAMAuthenticator

    set_role(instance, "tanaka", "analyst")
    auth = SekishoPAMAuthenticator(sekisho_home=str(instance.home))

    async def pam(self, handler, data):
        return data["username"]
    monkeypatch.setattr(PAMAuthenticator, "authenticate", pam)

    def broken(self, *args, **kwargs):
        raise AuditError("disk full")
    monkeypatch.setattr(AuditLog, "append", broken)
    assert asyncio.run(auth.get_authenticated_user(None, {"username": "tanaka", "password": "x"})) is None


def test_removed_person_is_logged_out_at_the_next_refresh(instance):
    from types import SimpleNamespace

    from sekisho.hub.auth import SekishoPAMAuthenticator
    from sekisho.state import remove_user

    set_role(instance, "tanaka", "analyst")
    auth = SekishoPAMAuthenticator(sekisho_home=str(instance.home))
    user = SimpleNamespace(name="tanaka")
    assert asyncio.run(auth.refresh_user(user)) == {"name": "tanaka", "groups": ["analysts"]}
    set_role(instance, "tanaka", "manager")
    assert asyncio.run(auth.refresh_user(user))["groups"] == ["managers"]
    remove_user(instance, "tanaka")
    assert asyncio.run(auth.refresh_user(user)) is False


def test_a_burst_of_failed_logins_raises_an_alert(instance, monkeypatch):
    from jupyterhub.auth import PAMAuthenticator

    from sekisho.hub.auth import SekishoPAMAuthenticator

    set_role(instance, "tanaka", "analyst")
    auth = SekishoPAMAuthenticator(sekisho_home=str(instance.home), failed_login_alert_threshold=3)

    async def pam(self, handler, data):
        return None  # every password is wrong
    monkeypatch.setattr(PAMAuthenticator, "authenticate", pam)

    for _ in range(2):
        asyncio.run(auth.get_authenticated_user(None, {"username": "tanaka", "password": "guess"}))
    assert not [e for e in instance.audit.entries(type="alert") if e["type"] == "alert"]
    asyncio.run(auth.get_authenticated_user(None, {"username": "tanaka", "password": "guess"}))
    alerts = [e for e in instance.audit.entries(type="alert") if e["type"] == "alert"]
    assert len(alerts) == 1
    assert alerts[0]["user"] == "tanaka" and alerts[0]["details"]["alert"] == "failed_login_burst"
    assert alerts[0]["details"]["failures"] == 3


def test_a_flood_of_failed_logins_adds_a_bounded_number_of_entries(instance, monkeypatch):
    # failures need no credential: a flood from one address is one login.failed entry per
    # name typed plus one aggregate each with the count, and one alert per name, not one
    # entry per failure
    from types import SimpleNamespace

    from jupyterhub.auth import PAMAuthenticator

    from sekisho.hub.auth import SekishoPAMAuthenticator

    set_role(instance, "tanaka", "analyst")
    auth = SekishoPAMAuthenticator(sekisho_home=str(instance.home), failed_login_alert_threshold=3)

    async def pam(self, handler, data):
        return None
    monkeypatch.setattr(PAMAuthenticator, "authenticate", pam)
    handler = SimpleNamespace(request=SimpleNamespace(remote_ip="203.0.113.9"))
    before = len(list(instance.audit.entries()))
    for i in range(200):
        name = "tanaka" if i % 2 else f"guess{i % 7}"
        asyncio.run(auth.get_authenticated_user(handler, {"username": name, "password": f"p{i}"}))
    auth._failed_logins.flush_all()
    new = list(instance.audit.entries())[before:]
    failed = [e for e in new if e["type"] == "login.failed"]
    aggregates = [e for e in new if e["type"] == "access.denied"]
    alerts = [e for e in new if e["type"] == "alert"]
    assert sorted(e["user"] for e in failed) == sorted(["tanaka"] + [f"guess{i}" for i in range(7)])
    assert {e["details"]["remote_ip"] for e in failed} == {"203.0.113.9"}
    assert sum(e["details"]["count"] for e in aggregates) == 200 - 8     # every failure counted
    assert len(aggregates) <= 2 * 8                                        # a minute boundary at most
    assert "ip:203.0.113.9 claimed:tanaka" in {e["details"]["source"] for e in aggregates}
    assert sorted(e["user"] for e in alerts) == sorted(["tanaka", *{f"guess{i % 7}" for i in range(0, 200, 2)}])
    assert "p17" not in instance.audit.path.read_text()
    # the people page counts them all for the name typed
    from sekisho.services.audit_activity import person_activity

    people = {p.user: p for p in person_activity(instance.audit.entries())}
    assert people["tanaka"].failed_logins == 100
