"""The analysts' servers: one local process per person, as that person's OS user.

``SekishoSpawner`` is JupyterHub's ``LocalProcessSpawner`` with three additions:

* only a person whose Sekisho role may start a server (``can_start_server`` in the
  policy) gets one — checked here again, behind the hub's scopes;
* ``server.start`` / ``server.stop`` go into the audit trail, attributed to the person
  (a start that cannot be audited is undone: fail closed);
* the server's environment is built from an allow-list: nothing of the service side
  (instance path, proxy token, cookie secret, services' tokens) reaches it. The only
  credential it holds is its own hub token, whose scopes the hub limits to
  ``Spawner.server_token_scopes``.
"""

from __future__ import annotations

import re
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from tornado import web
from traitlets import Unicode

from sekisho.access import current_capabilities
from sekisho.audit import AuditError
from sekisho.instance import Instance
from sekisho.state import role_of

# Variables the hub sets for a server; everything else is dropped unless configured in
# Spawner.environment (PATH, LANG, SEKISHO_GUARD_URL, JUPYTER_PATH).
HUB_SERVER_VARIABLES = re.compile(r"^(JUPYTERHUB_[A-Z_]+|HOME|USER|SHELL|PATH|LANG|LC_ALL"
                                  r"|JUPYTER_PATH|SEKISHO_GUARD_URL|JUPYTERHUB_SINGLEUSER_APP)$")
# Hub variables that would be secrets of the service side if they ever appeared.
NEVER_PASSED = frozenset({"JUPYTERHUB_CRYPT_KEY", "JPY_COOKIE_SECRET", "CONFIGPROXY_AUTH_TOKEN",
                          "JUPYTERHUB_COOKIE_SECRET", "JPY_API_TOKEN"})


class SekishoSpawner(LocalProcessSpawner):
    sekisho_home = Unicode("", config=True, help="The Sekisho instance (for roles and the audit trail).")

    _instance: Instance | None = None

    @property
    def instance(self) -> Instance:
        if self._instance is None:
            self._instance = Instance.open(self.sekisho_home or None)
        return self._instance

    def _audit(self, type: str, outcome: str, summary: str, details: dict[str, Any]) -> None:
        name = self.user.name
        self.instance.audit.append(type, user=name, role=role_of(self.instance, name), outcome=outcome,
                                   summary=summary, details={"server_name": self.name, **details})

    def _may_start(self) -> tuple[bool, str | None]:
        role = role_of(self.instance, self.user.name)
        return current_capabilities(self.instance.policy_path, role).can_start_server, role

    async def start(self):
        allowed, role = self._may_start()
        if not allowed:
            try:
                self._audit("server.start", "denied", f"server start refused for {self.user.name} (role {role})",
                            {"reason": "role_cannot_start_server"})
            except AuditError as exc:
                self.log.error("could not audit a refused server start: %s", exc)
            raise web.HTTPError(403, "このロールではサーバーを起動できません / "
                                     f"role {role!r} may not start a server")
        try:
            url = await super().start()
        except Exception as exc:
            try:
                self._audit("server.start", "failed", f"server of {self.user.name} failed to start",
                            {"error": type(exc).__name__})
            except AuditError as audit_exc:
                self.log.error("could not audit a failed server start: %s", audit_exc)
            raise
        ip, port = url if isinstance(url, tuple) else (str(url), None)
        self._started_pid = self.pid
        try:
            self._audit("server.start", "ok", f"server of {self.user.name} started",
                        {"pid": self.pid, "ip": ip, "port": port})
        except AuditError as exc:
            self.log.error("stopping the server of %s: the audit trail cannot be written: %s", self.user.name, exc)
            await super().stop(now=True)
            raise web.HTTPError(503, "監査ログに記録できないためサーバーを起動できません / "
                                     "the audit trail cannot be written") from exc
        return url

    async def stop(self, now=False):
        self._stop_requested = True
        self._stopped_pid = self.pid
        try:
            await super().stop(now=now)
        except Exception as exc:
            self._try_audit("server.stop", "failed", {"pid": self._stopped_pid, "error": type(exc).__name__})
            raise

    def run_post_stop_hook(self):
        # The hub calls this after every stop, including a server that died on its own
        # (then stop() is never called): one place that sees every end of a server.
        requested = getattr(self, "_stop_requested", False)
        # a dead server's pid is already cleared by poll(); fall back to the one we started
        pid = (getattr(self, "_stopped_pid", None) if requested else self.pid) or getattr(self, "_started_pid", None)
        self._stop_requested, self._stopped_pid = False, None
        self._try_audit("server.stop", "ok", {"pid": pid, "ended": "stopped" if requested else "exited"})
        return super().run_post_stop_hook()

    def _try_audit(self, type: str, outcome: str, details: dict[str, Any]) -> None:
        try:
            self._audit(type, outcome, f"server of {self.user.name} stopped"
                        if outcome == "ok" else f"server of {self.user.name} failed to stop", details)
        except AuditError as exc:  # the server is gone either way; make the gap visible in the log
            self.log.error("could not audit %s for %s: %s", type, self.user.name, exc)

    def get_env(self):
        env = super().get_env()
        for key in list(env):
            if key in NEVER_PASSED or not HUB_SERVER_VARIABLES.match(key):
                del env[key]
        return env
