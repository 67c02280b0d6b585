"""A real JupyterHub for end-to-end tests (``@pytest.mark.hub``).

``start_hub()`` (or the session fixture ``hub`` in conftest.py) gives a ``RunningHub``:

* a fresh instance under ``/var/tmp`` (the ``sekisho`` service account must be able to
  reach it, which it cannot under pytest's 0700 ``/tmp/pytest-of-root``), with the
  synthetic city ingested when ``sekisho synth`` and ``sekisho ingest`` are available;
* real system users, one per role, created with ``sekisho users add`` (names
  ``skt-<role>-<random>``, so concurrent test sessions never collide) and deleted at the
  end; their PAM passwords are in ``hub.users[role].password``;
* JupyterHub started with ``sekisho hub`` on free loopback ports (proxy, hub API,
  proxy API and each service), stopped at the end.

Helpers: ``hub.login(user)`` (a ``HubSession``: POST /hub/login with the form's xsrf
token, like a browser), ``session.api(method, path)``, ``hub.start_server(user)``,
``hub.stop_server(user)``, ``hub.new_token(user, scopes)``, ``hub.server_pid(user)``,
``hub.server_environ(user)`` (read from /proc), ``hub.server_token(user)``.

Needs root (system users, PAM, setuid spawning) and configurable-http-proxy.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from sekisho.instance import Instance, secure

VENV_BIN = Path(sys.prefix) / "bin"
SEKISHO = str(VENV_BIN / "sekisho")
USER_PREFIX = "skt-"
ROLE_ABBREVIATIONS = {"analyst": "ana", "admin": "adm", "manager": "mgr", "steward": "stw"}
DEFAULT_POPULATION = 3000


class HubTestError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_prerequisites() -> str | None:
    """Why a real hub cannot run here, or None."""
    if os.geteuid() != 0:
        return "the hub tests need root (system users, PAM, setuid spawning)"
    if not shutil.which("configurable-http-proxy"):
        return "configurable-http-proxy is not installed"
    if not Path("/etc/pam.d/login").exists():
        return "PAM service 'login' is not configured"
    return None


def run_sekisho(*args: str, home: Path, check: bool = True, timeout: int = 600,
                with_home: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, SEKISHO_HOME=str(home))
    cmd = [SEKISHO, *args, "--home", str(home)] if with_home else [SEKISHO, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise HubTestError(f"sekisho {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class HubUser:
    name: str
    role: str
    password: str


class HubSession(requests.Session):
    """A logged-in browser-like session (cookies + the hub's xsrf token)."""

    def __init__(self, hub: "RunningHub", user: HubUser | None = None):
        super().__init__()
        self.hub = hub
        self.user = user

    def xsrf(self, path: str = "/hub/") -> str:
        """The xsrf token of ``path`` (servers and services set their own under their prefix)."""
        candidates = {c.path: c.value for c in self.cookies if c.name == "_xsrf"}
        return candidates.get(path) or candidates.get("/", "") or next(iter(candidates.values()), "")

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"X-XSRFToken": self.xsrf(), **kwargs.pop("headers", {})}
        return self.request(method, self.hub.url + "hub/api" + path, headers=headers, **kwargs)

    def get_page(self, path: str, **kwargs: Any) -> requests.Response:
        return self.get(self.hub.url + path.lstrip("/"), **kwargs)


@dataclass
class RunningHub:
    home: Path
    url: str                      # public URL (the proxy), ends with /
    ports: dict[str, int]
    process: subprocess.Popen | None = None
    users: dict[str, HubUser] = field(default_factory=dict)
    log_path: Path | None = None
    base_dir: Path | None = None
    populated: bool = False
    _created: list[str] = field(default_factory=list)  # system users to delete at the end

    @property
    def instance(self) -> Instance:
        return Instance.open(self.home)

    # ---- people --------------------------------------------------------------
    def add_user(self, role: str, name: str | None = None) -> HubUser:
        name = name or f"{USER_PREFIX}{ROLE_ABBREVIATIONS[role]}-{secrets.token_hex(3)}"
        out = run_sekisho("users", "add", name, "--role", role, home=self.home).stdout
        match = re.search(rf"initial password for {re.escape(name)}: (\S+)", out)
        if not match:
            raise HubTestError(f"no password printed by `sekisho users add`: {out!r}")
        user = HubUser(name=name, role=role, password=match.group(1))
        self.users.setdefault(role, user)
        self._created.append(name)
        return user

    def login(self, user: HubUser, password: str | None = None) -> HubSession:
        session = HubSession(self, user)
        response = self.post_login(session, user.name, password or user.password)
        if response.status_code != 302 or not session.cookies.get("jupyterhub-hub-login"):
            raise HubTestError(f"login of {user.name} failed: {response.status_code} {response.text[:300]}")
        session.landing = response.headers.get("Location")
        return session

    def post_login(self, session: HubSession, name: str, password: str) -> requests.Response:
        session.get(self.url + "hub/login").raise_for_status()
        return session.post(self.url + "hub/login", allow_redirects=False,
                            data={"username": name, "password": password, "_xsrf": session.xsrf()})

    def failed_login(self, name: str, password: str) -> int:
        return self.post_login(HubSession(self), name, password).status_code

    # ---- servers -------------------------------------------------------------
    def start_server(self, user: HubUser, session: HubSession | None = None, timeout: float = 90) -> dict:
        session = session or self.login(user)
        response = session.api("POST", f"/users/{user.name}/server")
        if response.status_code not in (201, 202, 400):  # 400: already running
            raise HubTestError(f"start of {user.name}'s server refused: {response.status_code} {response.text}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = session.api("GET", f"/users/{user.name}").json()
            server = model.get("servers", {}).get("")
            if server and server.get("ready"):
                return server
            time.sleep(0.5)
        raise HubTestError(f"{user.name}'s server did not become ready in {timeout}s (see {self.log_path})")

    def stop_server(self, user: HubUser, session: HubSession | None = None, timeout: float = 60) -> None:
        session = session or self.login(user)
        response = session.api("DELETE", f"/users/{user.name}/server")
        if response.status_code not in (202, 204):
            raise HubTestError(f"stop of {user.name}'s server failed: {response.status_code} {response.text}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not session.api("GET", f"/users/{user.name}").json().get("servers"):
                return
            time.sleep(0.5)
        raise HubTestError(f"{user.name}'s server did not stop in {timeout}s")

    def new_token(self, user: HubUser, scopes: list[str] | None = None, session: HubSession | None = None) -> str:
        session = session or self.login(user)
        body: dict[str, Any] = {"note": "sekisho test", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        response = session.api("POST", f"/users/{user.name}/tokens", json=body)
        if response.status_code != 201:
            raise HubTestError(f"token for {user.name} refused: {response.status_code} {response.text}")
        return response.json()["token"]

    def server_pid(self, user: HubUser) -> int:
        starts = [e for e in self.instance.audit.entries(user=user.name, type="server.start")
                  if e["outcome"] == "ok"]
        if not starts:
            raise HubTestError(f"no audited server start for {user.name}")
        return int(starts[-1]["details"]["pid"])

    def server_environ(self, user: HubUser) -> dict[str, str]:
        raw = Path(f"/proc/{self.server_pid(user)}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    def server_token(self, user: HubUser) -> str:
        return self.server_environ(user)["JUPYTERHUB_API_TOKEN"]

    def whoami(self, token: str) -> requests.Response:
        return requests.get(self.url + "hub/api/user", headers={"Authorization": f"token {token}"})

    # ---- lifecycle -------------------------------------------------------------
    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise HubTestError(f"the hub exited ({self.process.returncode}); log:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "hub/api/", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise HubTestError(f"the hub did not answer in {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the hub stops servers, services and proxy
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cleanup(self) -> None:
        self.stop()
        for name in reversed(self._created):
            _kill_processes_of(name)
            run_sekisho("users", "remove", name, "--delete-account", home=self.home, check=False)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _kill_processes_of(user: str) -> None:
    """End leftover processes of a test user (by pid) so the account can be deleted."""
    proc = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_hub_config(home: Path, **hub: Any) -> None:
    """Set the instance's ``hub:`` section (as an operator would edit config.yaml)."""
    path = home / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config["hub"] = {**(config.get("hub") or {}), **hub}
    tmp = path.with_name("config.yaml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
    os.replace(tmp, path)
    secure(path)


def start_hub(*, services: list[str] | None = None, population: int | None = DEFAULT_POPULATION,
              roles: tuple[str, ...] = ("analyst", "admin", "manager", "steward")) -> RunningHub:
    """Create an instance and its people, start JupyterHub, return a RunningHub.

    ``services``: which Sekisho services to run (default: all installed).
    ``population``: persons in the synthetic city to ingest (None: no data).
    """
    reason = hub_prerequisites()
    if reason:
        raise HubTestError(reason)
    base = Path(tempfile.mkdtemp(prefix="sekisho-hubtest-", dir="/var/tmp"))
    os.chmod(base, 0o711)  # the service account traverses it to reach its instance
    home = base / "instance"
    ports = {"port": free_port(), "hub_port": free_port(), "proxy_api_port": free_port()}
    service_ports = {"guard": free_port(), "audit": free_port(), "reports": free_port()}
    hub = RunningHub(home=home, url=f"http://127.0.0.1:{ports['port']}/",
                     ports={**ports, **{f"service_{k}": v for k, v in service_ports.items()}},
                     base_dir=base, log_path=base / "hub.log")
    try:
        run_sekisho("init", home=home)
        hub_cfg: dict[str, Any] = {"ip": "127.0.0.1", **ports, "service_ports": service_ports}
        if services is not None:
            hub_cfg["services"] = list(services)
        write_hub_config(home, **hub_cfg)
        if population:
            hub.populated = _populate_with_steward(hub, population, base)
        for role in roles:
            if role not in hub.users:
                hub.add_user(role)
        log = open(hub.log_path, "wb")
        hub.process = subprocess.Popen([SEKISHO, "hub", "--home", str(home)], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=dict(os.environ, SEKISHO_HOME=str(home)))
        log.close()
        hub.wait_ready()
    except BaseException:
        hub.cleanup()
        raise
    return hub


def _populate_with_steward(hub: RunningHub, population: int, base: Path) -> bool:
    import importlib.util

    if importlib.util.find_spec("sekisho.cli.synth") is None or importlib.util.find_spec("sekisho.cli.ingest") is None:
        return False
    steward = hub.add_user("steward")
    source = base / "source"
    run_sekisho("synth", "--population", str(population), "--out", str(source), "--seed", "7", "--quiet",
                home=hub.home, with_home=False)
    run_sekisho("ingest", str(source), "--as", steward.name, "--quiet", home=hub.home)
    return True


def audit_entries(hub: RunningHub, **filters: Any) -> list[dict[str, Any]]:
    return list(hub.instance.audit.entries(**filters))


def dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1)
