"""The analysis environment end to end: a real JupyterHub, real PAM logins, real servers.

Uses the session fixture ``hub`` (tests/hub_fixtures.py): an instance under /var/tmp,
system users made by ``sekisho users add``, JupyterHub started by ``sekisho hub``.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from hub_fixtures import SEKISHO, HubTestError, RunningHub
from sekisho.hub.spawner import NEVER_PASSED

pytestmark = pytest.mark.hub

GUARD_SCOPE = "access:services!service=guard"


def services_running(hub: RunningHub) -> set[str]:
    from sekisho.hub.config import available_services, hub_settings

    return set(available_services(hub_settings(hub.instance).services))


def audit(hub: RunningHub, **filters):
    return list(hub.instance.audit.entries(**filters))


# ---- logging in and starting servers -----------------------------------------------------

def test_analyst_logs_in_with_pam_and_starts_a_server_as_their_own_os_user(hub):
    analyst = hub.users["analyst"]
    session = hub.login(analyst)
    assert session.landing == "/hub/spawn"  # analysts land on their server
    assert 'id="start"' in session.get(hub.url + "hub/home").text
    server = hub.start_server(analyst, session)
    assert server["ready"] and server["url"] == f"/user/{analyst.name}/"

    pid = hub.server_pid(analyst)
    assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(analyst.name).pw_uid
    # the shared, world-readable venv runs it
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1].decode() == str(Path(sys.prefix) / "bin" / "jupyterhub-singleuser")
    # JupyterLab answers through the proxy for its owner (after the OAuth handshake)
    lab = session.get(hub.url + f"user/{analyst.name}/lab")
    assert lab.status_code == 200 and lab.url.endswith(f"/user/{analyst.name}/lab"), lab.url
    token = hub.new_token(analyst, session=session)
    contents = requests.get(hub.url + f"user/{analyst.name}/api/contents",
                            headers={"Authorization": f"token {token}"})
    assert contents.status_code == 200


def test_manager_cannot_start_a_server(hub):
    manager = hub.users["manager"]
    session = hub.login(manager)
    assert session.landing != "/hub/spawn"
    refused = session.api("POST", f"/users/{manager.name}/server")
    assert refused.status_code == 403
    spawn_page = session.get(hub.url + "hub/spawn")
    assert spawn_page.status_code == 403
    assert "この操作を行う権限がありません" in spawn_page.content.decode()  # a clear page, in Japanese
    home = session.get(hub.url + "hub/home").text
    assert 'id="sekisho-no-server"' in home and 'id="start"' not in home
    assert not session.api("GET", f"/users/{manager.name}").json().get("servers")
    assert not [e for e in audit(hub, user=manager.name, type="server.start") if e["outcome"] == "ok"]


@pytest.mark.parametrize("role", ["admin", "steward"])
def test_other_roles_cannot_start_a_server_either(hub, role):
    person = hub.users[role]
    session = hub.login(person)
    assert session.api("POST", f"/users/{person.name}/server").status_code == 403


def test_the_spawner_itself_refuses_a_role_without_the_server_right(hub):
    """Behind the hub's scopes: even a start that got past them is refused and audited."""
    from types import SimpleNamespace

    import asyncio

    from tornado import web

    from sekisho.hub.spawner import SekishoSpawner

    manager = hub.users["manager"]
    spawner = SekishoSpawner(user=SimpleNamespace(name=manager.name, url=f"/user/{manager.name}/"),
                             sekisho_home=str(hub.home))
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(spawner.start())
    assert refused.value.status_code == 403
    last = audit(hub, user=manager.name, type="server.start")[-1]
    assert last["outcome"] == "denied" and last["details"]["reason"] == "role_cannot_start_server"


# ---- what an analyst's server holds --------------------------------------------------------

def test_analyst_server_token_adds_only_the_guard_scope_to_the_defaults(hub):
    analyst = hub.users["analyst"]
    hub.start_server(analyst)
    token = hub.server_token(analyst)
    scopes = set(hub.whoami(token).json()["scopes"])
    name = analyst.name
    defaults = {f"access:servers!server={name}/", f"users:activity!user={name}",
                # implied by any token: identify its owner
                f"read:users:name!user={name}", f"read:users:groups!user={name}",
                f"read:users:activity!user={name}"}
    guard = {GUARD_SCOPE} if "guard" in services_running(hub) else set()
    assert scopes == defaults | guard
    # and it really cannot do more: no listing users, no starting servers, no other service
    headers = {"Authorization": f"token {token}"}
    assert requests.get(hub.url + "hub/api/users", headers=headers).status_code == 403
    assert requests.post(hub.url + f"hub/api/users/{name}/tokens", headers=headers, json={}).status_code == 403


def test_only_the_analyst_role_gets_the_guard_scope(hub):
    if "guard" not in services_running(hub):
        pytest.skip("the guard service is not installed")
    for role in ("manager", "admin", "steward"):
        person = hub.users[role]
        session = hub.login(person)
        scopes = set(session.api("GET", "/user").json()["scopes"])
        assert GUARD_SCOPE not in scopes, role
        # asking for it explicitly does not help: the hub only grants what the role holds
        response = session.api("POST", f"/users/{person.name}/tokens", json={"scopes": [GUARD_SCOPE]})
        assert response.status_code in (400, 403), (role, response.text)


def _secrets_of_the_service_side(hub: RunningHub, server_pid: int) -> dict[str, str]:
    """Every secret the hub side holds: instance keys, cookie secret, proxy/service tokens."""
    found = {
        "instance secret": (hub.home / "secret.key").read_text().strip(),
        "audit key": (hub.home / "audit.key").read_text().strip(),
        "hub cookie secret": (hub.home / "hub" / "jupyterhub_cookie_secret").read_text().strip(),
    }
    children = subprocess.run(["pgrep", "-P", str(hub.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        if int(pid) == server_pid:
            continue
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for item in raw.split("\0"):
            key, _, value = item.partition("=")
            if value and any(word in key for word in ("TOKEN", "SECRET", "KEY")):
                found[f"{key} of pid {pid}"] = value
    assert any("CONFIGPROXY_AUTH_TOKEN" in k for k in found), "the proxy's token was not found to compare"
    return found


def test_server_environment_holds_no_secret_of_the_service_side(hub):
    analyst = hub.users["analyst"]
    hub.start_server(analyst)
    pid = hub.server_pid(analyst)
    env = hub.server_environ(analyst)
    secrets = _secrets_of_the_service_side(hub, pid)
    for what, value in secrets.items():
        assert not any(value in v for v in env.values()), f"{what} leaked into the server's environment"
    assert not (NEVER_PASSED & set(env))
    assert not any(k.startswith("SEKISHO_") and k != "SEKISHO_GUARD_URL" for k in env)
    assert not any(str(hub.home) in v for v in env.values()), "the instance path reached the server"
    assert env["USER"] == analyst.name and env["HOME"] == f"/home/{analyst.name}"


def test_analyst_cannot_read_the_instance(hub):
    analyst = hub.users["analyst"]
    probe = subprocess.run(["runuser", "-u", analyst.name, "--", "cat", str(hub.home / "secret.key")],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    other_home = subprocess.run(["runuser", "-u", analyst.name, "--", "ls", f"/home/{hub.users['manager'].name}"],
                                capture_output=True, text=True)
    assert other_home.returncode != 0


# ---- admins review, they do not administer --------------------------------------------------

def test_admin_is_not_a_hub_admin_and_cannot_reach_the_analysts_server(hub):
    analyst, admin = hub.users["analyst"], hub.users["admin"]
    hub.start_server(analyst)
    session = hub.login(admin)
    me = session.api("GET", "/user").json()
    assert me["admin"] is False and "admin" not in me["roles"]
    assert session.api("GET", "/users").status_code == 403
    assert session.api("POST", f"/users/{analyst.name}/server").status_code == 403
    assert session.api("DELETE", f"/users/{analyst.name}/server").status_code == 403
    assert session.get(hub.url + "hub/admin").status_code == 403
    # through the proxy to the analyst's JupyterLab: the hub refuses the OAuth handshake ...
    reached = session.get(hub.url + f"user/{analyst.name}/lab")
    assert reached.status_code == 403, (reached.status_code, reached.url)
    assert "/hub/api/oauth2/authorize" in reached.url
    # ... and the server refuses the admin's own token
    token = hub.new_token(admin, session=session)
    api = requests.get(hub.url + f"user/{analyst.name}/api/contents", headers={"Authorization": f"token {token}"})
    assert api.status_code == 403


def test_one_analyst_cannot_reach_another_analysts_server(hub):
    analyst = hub.users["analyst"]
    hub.start_server(analyst)
    other = hub.add_user("analyst")
    session = hub.login(other)
    assert session.get(hub.url + f"user/{analyst.name}/lab").status_code == 403
    assert session.api("POST", f"/shares/{analyst.name}/", json={"user": other.name}).status_code in (403, 404)
    token = hub.new_token(other, session=session)
    headers = {"Authorization": f"token {token}"}
    assert requests.get(hub.url + f"user/{analyst.name}/api/contents", headers=headers).status_code == 403


# ---- the session trail ------------------------------------------------------------------------

def test_session_events_go_into_the_chain_and_it_verifies(hub):
    person = hub.add_user("analyst")
    start = hub.instance.audit.head()[0]

    assert hub.failed_login(person.name, "not-the-password") == 403
    session = hub.login(person)
    hub.start_server(person, session)
    hub.stop_server(person, session)
    session.get(hub.url + "hub/logout")

    # a person with an OS account but no Sekisho role is refused, and that is recorded too
    stranger = hub.add_user("manager")
    subprocess.run([SEKISHO, "users", "remove", stranger.name, "--home", str(hub.home)], check=True,
                   capture_output=True)
    with pytest.raises(HubTestError):
        hub.login(stranger)

    new = [e for e in hub.instance.audit.entries() if e["seq"] > start]
    mine = [(e["type"], e["outcome"]) for e in new if e["user"] == person.name]
    assert mine == [("login.failed", "denied"), ("login", "ok"), ("server.start", "ok"),
                    ("server.stop", "ok"), ("logout", "ok")]
    failed = next(e for e in new if e["type"] == "login.failed" and e["user"] == person.name)
    assert failed["details"]["reason"] == "bad_credentials" and "not-the-password" not in str(failed)
    refused = [e for e in new if e["user"] == stranger.name and e["type"] == "login.failed"]
    assert refused and refused[-1]["details"]["reason"] == "no_sekisho_role"

    verify = subprocess.run([SEKISHO, "audit", "verify", "--home", str(hub.home)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "audit chain OK" in verify.stdout


def test_services_run_as_the_service_account(hub):
    from sekisho.instance import service_account_ids

    uid = service_account_ids()[0]
    children = subprocess.run(["pgrep", "-P", str(hub.process.pid)], capture_output=True, text=True).stdout.split()
    services = {}
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        module = next((part.decode() for part in cmdline if part.startswith(b"sekisho.services.")), None)
        if module:
            services[module] = os.stat(f"/proc/{pid}").st_uid
    expected = {f"sekisho.services.{m}" for m in ("guard", "audit_review", "reports")
                if m.replace("audit_review", "audit") in services_running(hub)}
    assert set(services) == expected and expected
    assert set(services.values()) == {uid}
    assert os.stat(f"/proc/{hub.process.pid}").st_uid == 0  # the hub itself: root (setuid spawning, PAM)


def test_a_server_that_dies_on_its_own_is_recorded_as_stopped(hub):
    import signal
    import time

    person = hub.add_user("analyst")
    hub.start_server(person)
    pid = hub.server_pid(person)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    stops = []
    while time.monotonic() < deadline and not stops:
        stops = [e for e in audit(hub, user=person.name, type="server.stop") if e["details"].get("pid") == pid]
        time.sleep(1)
    assert stops, "the hub did not notice the dead server within 60 s"
    assert stops[0]["outcome"] == "ok" and stops[0]["details"]["ended"] == "exited"
