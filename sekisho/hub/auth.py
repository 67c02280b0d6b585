"""Authenticators for the Sekisho hub: every login attempt is audited.

``SekishoAuthMixin`` sits in front of any JupyterHub authenticator and

* records ``login`` (success) and ``login.failed`` (wrong credentials, or a person
  who has no Sekisho role) in the instance's hash-chained audit trail, and refuses the
  login when the entry cannot be written (fail closed). Failures are attacker-driven
  (no credential needed to send one), so they are aggregated like the hub's other
  denials (``sekisho.audit.DenialLog``): the first of its address, name typed, reason and
  minute is a ``login.failed`` entry, the rest of that minute one aggregate entry with
  their count (a flood over many names: at most ``MAX_BUCKETS`` such pairs a minute, then
  one overflow aggregate); a password-guessing alert is raised at most once per name and
  window, and at most ``MAX_ALERTS_PER_MINUTE`` a minute;
* admits only people who have exactly one human Sekisho role, and puts them in that
  role's hub group (``analysts``, ``admins``, ``managers``, ``stewards``) — the hub
  roles bound to those groups carry the scopes (``sekisho.hub.roles``);
* records ``logout`` through its own logout handler.

Where the role comes from:

* ``role_source = "registry"`` (PAM, the default): the instance's user registry,
  maintained with ``sekisho users add/set-role/remove``;
* ``role_source = "groups"`` (LDAP, OIDC, Azure AD): the identity provider's groups,
  mapped by ``group_roles``; the registry is then updated to match at each login
  (audited ``users.set-role``), so the services see the same role.
"""

from __future__ import annotations

import os
import time
from typing import Any

from jupyterhub.auth import Authenticator, PAMAuthenticator
from jupyterhub.handlers.login import LogoutHandler
from jupyterhub.utils import maybe_future
from traitlets import Dict, Enum, Int, Unicode

from sekisho.access import HUB_GROUPS, HUMAN_ROLES
from sekisho.audit import LOGIN_SERVICE, AuditError, Denial, DenialLog
from sekisho.hub.roles import role_from_groups
from sekisho.instance import Instance
from sekisho.state import role_of, set_role

MAX_LOGGED_NAME = 64  # attempted user names are attacker input; keep the trail tidy
MAX_ALERTS_PER_MINUTE = 10   # failed-login alerts written a minute, whatever the number of names


def _remote_ip(handler) -> str | None:
    return getattr(getattr(handler, "request", None), "remote_ip", None)


class AuditedLogoutHandler(LogoutHandler):
    """The hub's logout, plus a ``logout`` audit entry for the person leaving."""

    async def handle_logout(self):
        user = self.current_user
        if user is not None:
            self.authenticator.audit_event(
                "logout", user=user.name, outcome="ok",
                summary=f"{user.name} logged out of the hub",
                details={"remote_ip": _remote_ip(self)})


class SekishoAuthMixin(Authenticator):
    """Audit and role gate for a JupyterHub authenticator (mix in first)."""

    sekisho_home = Unicode(
        "", config=True,
        help="The Sekisho instance whose registry and audit trail the hub uses.")

    role_source = Enum(
        ["registry", "groups"], default_value="registry", config=True,
        help="""Where a person's Sekisho role comes from: the instance's registry
        (`sekisho users add`, used with PAM) or the identity provider's groups
        mapped through `group_roles` (LDAP, OIDC, Azure AD).""")

    group_roles = Dict(
        key_trait=Unicode(), value_trait=Unicode(), config=True,
        help=f"""Identity-provider group -> Sekisho role ({', '.join(HUMAN_ROLES)}), for
        role_source = "groups". A person whose groups map to two different roles is refused.""")

    failed_login_alert_threshold = Int(
        5, config=True,
        help="""Raise an `alert` in the audit trail when one name fails to log in this many
        times within `failed_login_alert_window` seconds (password guessing). 0 disables.""")

    failed_login_alert_window = Int(600, config=True, help="Window (seconds) for failed_login_alert_threshold.")

    _instance: Instance | None = None

    @property
    def _failures(self) -> dict[str, list[float]]:
        if "_failure_times" not in self.__dict__:
            self.__dict__["_failure_times"] = {}
        return self.__dict__["_failure_times"]

    @property
    def _failed_logins(self) -> DenialLog:
        # one per authenticator: failed logins aggregated per address, reason and minute
        if "_failed_login_log" not in self.__dict__:
            self.__dict__["_failed_login_log"] = DenialLog(self.instance.audit, LOGIN_SERVICE)
        return self.__dict__["_failed_login_log"]

    @property
    def _alert_minutes(self) -> dict[str, int]:
        if "_alert_minute_counts" not in self.__dict__:
            self.__dict__["_alert_minute_counts"] = {}
        return self.__dict__["_alert_minute_counts"]

    @property
    def _credentials_ok(self) -> set[int]:
        # ids of login forms whose credentials the underlying authenticator accepted
        if "_credentials_ok_ids" not in self.__dict__:
            self.__dict__["_credentials_ok_ids"] = set()
        return self.__dict__["_credentials_ok_ids"]

    # ---- instance ----------------------------------------------------------
    @property
    def instance(self) -> Instance:
        if self._instance is None:
            self._instance = Instance.open(self.sekisho_home or None)
        return self._instance

    def audit_event(self, type: str, *, user: str, outcome: str, summary: str,
                    details: dict[str, Any], role: str | None = None) -> None:
        """Append to the trail; raises AuditError (the caller then refuses the action)."""
        if role is None and outcome == "ok":
            role = role_of(self.instance, user)
        self.instance.audit.append(type, user=user, role=role, outcome=outcome, summary=summary,
                                   details=details)

    # ---- roles -------------------------------------------------------------
    def idp_groups(self, auth_model: dict[str, Any]) -> list[str]:
        """Identity-provider groups in an auth model (overridden per provider)."""
        return list(auth_model.get("groups") or [])

    def sekisho_role_for(self, username: str, auth_model: dict[str, Any] | None) -> str | None:
        if self.role_source == "groups":
            role = role_from_groups(self.idp_groups(auth_model or {}), self.group_roles)
        else:
            role = role_of(self.instance, username)
        return role if role in HUMAN_ROLES else None

    def check_allowed(self, username: str, authentication: dict[str, Any] | None = None) -> bool:
        # The only way in: exactly one human Sekisho role. Nobody is allowed by default.
        return self.sekisho_role_for(username, authentication) is not None

    def is_admin(self, handler, authentication) -> bool:
        return False  # no Sekisho role is a hub admin

    # ---- login -------------------------------------------------------------
    async def authenticate(self, handler, data):
        result = await maybe_future(super().authenticate(handler, data))
        if result is not None:
            self._credentials_ok.add(id(data))  # tells a refusal from a bad password
        return result

    async def get_authenticated_user(self, handler, data):
        attempted = str((data or {}).get("username", ""))[:MAX_LOGGED_NAME]
        ip = _remote_ip(handler)
        try:
            result = await super().get_authenticated_user(handler, data)
        except Exception as exc:
            self._audit_failure(attempted, "error", ip, error=type(exc).__name__)
            raise
        finally:
            credentials_ok = id(data) in self._credentials_ok
            self._credentials_ok.discard(id(data))
        if result is None:
            self._audit_failure(attempted, "no_sekisho_role" if credentials_ok else "bad_credentials", ip)
            return None
        name = result["name"]
        role = self.sekisho_role_for(name, result)
        if role is None:  # the registry changed between the check and now
            self._audit_failure(name, "no_sekisho_role", ip)
            return None
        try:
            if self.role_source == "groups":
                self._sync_registry(name, role)
            self.audit_event("login", user=name, role=role, outcome="ok",
                             summary=f"{name} logged in to the hub as {role}",
                             details={"remote_ip": ip, "authenticator": type(self).__name__,
                                      "group": HUB_GROUPS[role]})
        except AuditError as exc:
            self.log.error("login of %s refused: the audit trail cannot be written: %s", name, exc)
            return None
        result["groups"] = [HUB_GROUPS[role]]
        result["admin"] = False
        return result

    def _audit_failure(self, attempted: str, reason: str, ip: str | None, **extra: Any) -> None:
        name = attempted or "(empty)"

        def first(denial: Denial) -> dict[str, Any]:
            return self.instance.audit.append(
                "login.failed", user=name, role=None, outcome="denied",
                summary=f"failed hub login for {attempted!r}: {reason}",
                details={"reason": reason, "remote_ip": ip, **extra})
        try:
            self._failed_logins.record(Denial(status=403, code=reason, path="login", route="login",
                                              remote_ip=ip, claimed=name, why=f"failed hub login: {reason}"),
                                       first=first)
            self._check_failure_burst(name, ip)
        except AuditError as exc:  # the login is refused anyway; say so loudly
            self.log.error("could not audit a failed login for %r: %s", attempted, exc)

    def _check_failure_burst(self, name: str, ip: str | None) -> None:
        """Many failures for one name in a short time: someone may be guessing passwords.
        One alert per name and window (the failures themselves are counted in the trail)."""
        threshold, window = self.failed_login_alert_threshold, self.failed_login_alert_window
        if threshold <= 0:
            return
        now = time.monotonic()
        recent = [t for t in self._failures.get(name, []) if now - t < window] + [now]
        minute = int(time.time() // 60)
        alerts = self._alert_minutes
        if minute not in alerts:
            alerts.clear()
            alerts[minute] = 0
        if len(recent) == threshold and alerts[minute] < MAX_ALERTS_PER_MINUTE:
            alerts[minute] += 1
            self.audit_event("alert", user=name, role=role_of(self.instance, name), outcome="ok",
                             summary=f"hub alert: {len(recent)} failed logins for {name!r} within {window}s",
                             details={"alert": "failed_login_burst", "failures": len(recent),
                                      "window_s": window, "remote_ip": ip})
        self._failures[name] = recent
        if len(self._failures) > 10_000:  # attempted names are attacker input: keep the table bounded
            for other in [n for n, times in self._failures.items() if not times or now - times[-1] >= window]:
                del self._failures[other]

    def _sync_registry(self, name: str, role: str) -> None:
        current = role_of(self.instance, name)
        if current == role:
            return
        set_role(self.instance, name, role)
        self.audit_event("users.set-role", user=name, role=role, outcome="ok",
                         summary=f"role of {name} set to {role} from identity-provider groups",
                         details={"name": name, "role": role, "previous": current,
                                  "source": type(self).__name__})

    async def refresh_user(self, user, handler=None):
        """Re-read the registry: a removed person is logged out, a changed role regroups."""
        role = role_of(self.instance, user.name)
        if role not in HUMAN_ROLES:
            return False
        return {"name": user.name, "groups": [HUB_GROUPS[role]]}

    # ---- logout ------------------------------------------------------------
    def get_handlers(self, app):
        return [*super().get_handlers(app), ("/logout", AuditedLogoutHandler)]


class SekishoPAMAuthenticator(SekishoAuthMixin, PAMAuthenticator):
    """PAM login against the system users made by ``sekisho users add``."""


def secret_from_env(name: str) -> str:
    """A secret for the hub config (client secret, bind password) from the environment.

    Keep such secrets out of config files: put them in a root-only environment file
    (e.g. systemd ``EnvironmentFile=/etc/sekisho/hub.env``, mode 0600).
    """
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"hub configuration: environment variable {name} is not set "
                           "(see docs/production-auth.md)")
    return value


def groups_from_ldap_auth_state(auth_model: dict[str, Any]) -> list[str]:
    """LDAP groups of an ldapauthenticator auth model (``ldap_groups`` and ``memberOf``)."""
    state = auth_model.get("auth_state") or {}
    groups: list[str] = list(state.get("ldap_groups") or [])
    member_of = (state.get("user_attributes") or {}).get("memberOf") or []
    groups += [member_of] if isinstance(member_of, str) else list(member_of)
    return groups
