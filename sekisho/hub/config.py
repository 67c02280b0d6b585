"""Build the JupyterHub configuration of a Sekisho instance.

``hub/jupyterhub_config.py`` calls :func:`configure` with the traitlets config object;
everything it sets is derived from the instance (``config.yaml: hub``) and the policy's
roles, so the hub, the services and the CLI agree on who may do what.

``config.yaml``'s ``hub`` section (all optional)::

    hub:
      ip: 127.0.0.1          # where people connect (the proxy)
      port: 8000
      hub_port: 8081         # the hub itself, loopback only
      proxy_api_port: 8001
      service_ports: {guard: 8091, audit: 8092, reports: 8093}
      services: [guard, audit, reports]        # default: every service that is installed
      auth_config: /etc/sekisho/auth_ldap.py   # extra hub config (LDAP, OIDC, Azure AD)

``SEKISHO_HUB_IP`` / ``SEKISHO_HUB_PORT`` override ``ip`` / ``port`` (``sekisho hub``).
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sekisho.access import CUSTOM_SCOPES, GUARD_SERVICE, SERVICES, Capabilities
from sekisho.errors import SekishoError
from sekisho.hub.auth import SekishoPAMAuthenticator
from sekisho.hub.denials import HubDenialLog
from sekisho.hub.roles import default_url_for, hub_roles, load_capabilities, server_token_scopes
from sekisho.hub.spawner import SekishoSpawner
from sekisho.instance import SERVICE_ACCOUNT, Instance, default_home, secure
from sekisho.resources import resource_dir
from sekisho.state import role_of

DEFAULT_SERVICE_PORTS = {name: service.default_port for name, service in SERVICES.items()}


class HubConfigError(SekishoError):
    """The instance cannot be served by the hub as configured."""


@dataclass(frozen=True)
class HubSettings:
    home: Path
    ip: str = "127.0.0.1"
    port: int = 8000
    hub_port: int = 8081
    proxy_api_port: int = 8001
    service_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SERVICE_PORTS))
    auth_config: str | None = None
    services: tuple[str, ...] | None = None  # None: every installed service

    @property
    def state_dir(self) -> Path:
        """The hub's own database, cookie secret and pid files."""
        return self.home / "hub"

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.ip in ("", "0.0.0.0") else self.ip
        return f"http://{host}:{self.port}/"

    def service_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.service_ports[name]}"


def hub_settings(instance: Instance, environ: dict[str, str] | None = None) -> HubSettings:
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = dict(instance.config.get("hub") or {})
    unknown = set(raw) - {"ip", "port", "hub_port", "proxy_api_port", "service_ports", "auth_config",
                          "services"}
    if unknown:
        raise HubConfigError(f"{instance.config_path}: hub: unknown key(s) {', '.join(sorted(unknown))}")
    ports = {**DEFAULT_SERVICE_PORTS, **(raw.get("service_ports") or {})}
    bad = set(ports) - set(SERVICES)
    if bad:
        raise HubConfigError(f"{instance.config_path}: hub.service_ports: unknown service(s) {', '.join(sorted(bad))}")
    services = raw.get("services")
    if services is not None:
        if not isinstance(services, list) or set(services) - set(SERVICES):
            raise HubConfigError(f"{instance.config_path}: hub.services: expected a list drawn from "
                                 f"{', '.join(SERVICES)}, got {services!r}")
        services = tuple(services)
    try:
        return HubSettings(
            home=instance.home,
            ip=str(environ.get("SEKISHO_HUB_IP") or raw.get("ip", "127.0.0.1")),
            port=int(environ.get("SEKISHO_HUB_PORT") or raw.get("port", 8000)),
            hub_port=int(raw.get("hub_port", 8081)),
            proxy_api_port=int(raw.get("proxy_api_port", 8001)),
            service_ports={k: int(v) for k, v in ports.items()},
            auth_config=raw.get("auth_config"),
            services=services,
        )
    except (TypeError, ValueError) as exc:
        raise HubConfigError(f"{instance.config_path}: hub: ports must be integers ({exc})") from None


def update_hub_config(instance: Instance, **values: Any) -> Instance:
    """Change keys of the instance's ``hub:`` section (config.yaml), atomically; return it reopened."""
    path = instance.config_path
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config["hub"] = {**(config.get("hub") or {}), **values}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
    os.replace(tmp, path)
    secure(path)
    return Instance.open(instance.home)


def available_services(wanted: tuple[str, ...] | None = None) -> list[str]:
    """The services to run: those asked for (all by default) whose module is installed."""
    names = SERVICES if wanted is None else wanted
    missing = [n for n in names if wanted is not None and importlib.util.find_spec(SERVICES[n].module) is None]
    if missing:
        raise HubConfigError(f"hub.services asks for {', '.join(missing)} but the module is not installed")
    return [n for n in names if importlib.util.find_spec(SERVICES[n].module) is not None]


def analyst_python() -> Path:
    """The Python environment analysts' servers run in: this one, which must be world-usable."""
    prefix = Path(sys.prefix)
    for p in (prefix, prefix / "bin"):
        mode = p.stat().st_mode
        if not (mode & stat.S_IROTH and mode & stat.S_IXOTH):
            raise HubConfigError(f"{p} is not readable by other users; analysts' servers run as their own "
                                 "OS users and need it (install Sekisho with scripts/install.sh)")
    return prefix


def services_config(settings: HubSettings, services: list[str], python: Path) -> list[dict[str, Any]]:
    return [{
        "name": name,
        "url": settings.service_url(name),
        "command": [str(python / "bin" / "python"), "-m", SERVICES[name].module],
        "user": SERVICE_ACCOUNT,
        "cwd": str(settings.home),
        "environment": {"SEKISHO_HOME": str(settings.home), "LANG": "C.UTF-8",
                        "PATH": f"{python / 'bin'}:/usr/local/bin:/usr/bin:/bin"},
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": SERVICES[name].oauth_scopes,
        "display": SERVICES[name].page,  # the guard is an API, not a page
        "info": {"title": SERVICES[name].title_ja},
    } for name in services]


def server_environment(settings: HubSettings, services: list[str], python: Path) -> dict[str, str]:
    env = {"PATH": f"{python / 'bin'}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if GUARD_SERVICE in services:
        env["SEKISHO_GUARD_URL"] = settings.service_url(GUARD_SERVICE) + SERVICES[GUARD_SERVICE].path
    try:
        kernels = resource_dir("kernels")
    except FileNotFoundError:
        kernels = None
    if kernels is not None and any(kernels.iterdir()):
        env["JUPYTER_PATH"] = str(kernels.parent)  # Jupyter finds <path>/kernels/<name>/kernel.json
    return env


def server_args() -> list[str]:
    """Make the Sekisho kernel (kernels/sekisho, helper CLIENT) the default in JupyterLab."""
    try:
        has_kernel = (resource_dir("kernels") / "sekisho" / "kernel.json").exists()
    except FileNotFoundError:
        has_kernel = False
    return ["--MappingKernelManager.default_kernel_name=sekisho"] if has_kernel else []


def configure(c, home: str | os.PathLike | None = None) -> HubSettings:
    """Fill the traitlets config ``c`` for the instance at ``home``."""
    instance = Instance.open(home or default_home())
    settings = hub_settings(instance)
    caps: dict[str, Capabilities] = load_capabilities(instance)
    services = available_services(settings.services)
    python = analyst_python()

    settings.state_dir.mkdir(mode=0o700, exist_ok=True)
    secure(settings.state_dir)
    state = settings.state_dir

    # --- network: people reach the proxy; the hub, its API and the services stay on loopback
    c.JupyterHub.bind_url = f"http://{settings.ip}:{settings.port}/"
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = settings.hub_port
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{settings.proxy_api_port}"
    c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
    c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")

    # --- who: PAM over `sekisho users add` accounts unless auth_config says otherwise
    c.JupyterHub.authenticator_class = SekishoPAMAuthenticator
    c.SekishoAuthMixin.sekisho_home = str(instance.home)
    c.Authenticator.manage_groups = True
    c.Authenticator.admin_users = set()
    c.Authenticator.any_allow_config = True  # check_allowed admits exactly the people with a Sekisho role
    c.Authenticator.auth_refresh_age = 60   # a removed person is logged out within a minute
    c.Authenticator.refresh_pre_spawn = True
    c.JupyterHub.shutdown_on_logout = True  # a server never outlives its owner's session

    # --- what: roles and scopes from the policy
    c.JupyterHub.custom_scopes = CUSTOM_SCOPES
    c.JupyterHub.load_roles = hub_roles(caps, services)

    # --- servers: one OS user per person, the shared world-readable venv, a minimal env
    c.JupyterHub.spawner_class = SekishoSpawner
    c.SekishoSpawner.sekisho_home = str(instance.home)
    # jupyterhub-singleuser, after the report notebooks are put in ~/公表レポート (sekisho.hub.singleuser)
    c.Spawner.cmd = [str(python / "bin" / "python"), "-I", "-m", "sekisho.hub.singleuser"]
    c.Spawner.default_url = "/lab"
    c.Spawner.args = server_args()  # the analysts' kernel (kernels/sekisho, via JUPYTER_PATH) by default
    c.Spawner.env_keep = []
    c.Spawner.environment = server_environment(settings, services, python)
    c.Spawner.server_token_scopes = server_token_scopes()
    c.Spawner.oauth_client_allowed_scopes = []  # browser tokens reach the server itself only
    c.Spawner.http_timeout = 60
    c.Spawner.start_timeout = 90
    c.Spawner.poll_interval = 10  # notice (and audit) a server that died on its own quickly

    # --- the Sekisho services, run by the hub as the service account
    c.JupyterHub.services = services_config(settings, services, python)

    def default_url(handler):
        user = handler.current_user
        role = role_of(instance, user.name) if user is not None else None
        return default_url_for(role, caps, services, base_url="/")

    c.JupyterHub.default_url = default_url

    # --- the hub's own 401/403 answers go into the audit trail, aggregated per source and minute
    c.JupyterHub.tornado_settings = {"log_function": HubDenialLog(instance)}
    templates = resource_dir("hub") / "templates"
    if templates.is_dir():
        c.JupyterHub.template_paths = [str(templates)]  # Japanese home and 403 pages
    return settings
