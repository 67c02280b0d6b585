"""Hub groups, roles and scopes, derived from the policy's roles.

Each human Sekisho role (``policies/*.yaml: roles``) becomes one hub *group* and one
hub *role* bound to that group. The hub role holds exactly the scopes the Sekisho
role's capabilities call for:

=====================  =====================================================
capability (policy)    hub scopes
=====================  =====================================================
``can_start_server``   ``servers!user``, ``access:servers!user`` (own server only)
``views`` not empty    ``access:services!service=guard``
``can_review_audit``   ``access:services!service=audit``, ``custom:sekisho:audit-review``
``can_read_reports``   ``access:services!service=reports``, ``custom:sekisho:reports-read``
=====================  =====================================================

The hub's default ``user`` role is narrowed so that nobody starts a server, shares
one or reaches a service merely by being a hub user. Nobody is a hub admin: Sekisho
"admins" review the audit trail and cannot reach anyone's server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sekisho.services.hubauth import (
    AUDIT_REVIEW_SCOPE,
    AUDIT_SERVICE,
    GUARD_SERVICE,
    REPORTS_READ_SCOPE,
    REPORTS_SERVICE,
    service_access_scope,
)
from sekisho.state import HUMAN_ROLES

# Sekisho role -> hub group (plural, as people say it) and hub role (prefixed so that
# Sekisho's "admin" can never be confused with the hub's built-in "admin" role).
GROUP_OF_ROLE = {"analyst": "analysts", "admin": "admins", "manager": "managers", "steward": "stewards"}
ROLE_OF_GROUP = {group: role for role, group in GROUP_OF_ROLE.items()}
HUB_ROLE_PREFIX = "sekisho-"

# What every logged-in hub user may do: see themselves, report activity, manage their
# own tokens (which can never exceed their own scopes). No servers, no sharing.
BASE_USER_SCOPES = ("read:users!user", "users:activity!user", "tokens!user")

CUSTOM_SCOPES = {
    AUDIT_REVIEW_SCOPE: {"description": "Sekisho: review the audit trail (監査ログの閲覧)"},
    REPORTS_READ_SCOPE: {"description": "Sekisho: read published reports (公表レポートの閲覧)"},
}


@dataclass(frozen=True)
class Capabilities:
    """What a Sekisho role may do in the analysis environment."""

    role: str
    can_query: bool
    can_start_server: bool
    can_review_audit: bool
    can_read_reports: bool

    @property
    def group(self) -> str:
        return GROUP_OF_ROLE[self.role]

    @property
    def hub_role(self) -> str:
        return HUB_ROLE_PREFIX + self.role


def capabilities_from_policy(policy) -> dict[str, Capabilities]:
    """Capabilities of each human role defined in a loaded ``sekisho.policy.Policy``."""
    caps = {}
    for name in HUMAN_ROLES:
        role = policy.roles.get(name)
        if role is None:
            continue  # a role the policy does not define gets no group and no scopes
        caps[name] = Capabilities(role=name, can_query=bool(role.views),
                                  can_start_server=role.can_start_server,
                                  can_review_audit=role.can_review_audit,
                                  can_read_reports=role.can_read_reports)
    return caps


def load_capabilities(instance) -> dict[str, Capabilities]:
    from sekisho.policy import load_policy

    return capabilities_from_policy(load_policy(instance.policy_path))


def scopes_for(cap: Capabilities, services: Iterable[str]) -> list[str]:
    """Hub scopes of a role; service scopes only for services the hub actually runs."""
    running = set(services)
    scopes: list[str] = []
    if cap.can_start_server:
        scopes += ["servers!user", "access:servers!user"]
    if cap.can_query and GUARD_SERVICE in running:
        scopes.append(service_access_scope(GUARD_SERVICE))
    if cap.can_review_audit and AUDIT_SERVICE in running:
        scopes += [service_access_scope(AUDIT_SERVICE), AUDIT_REVIEW_SCOPE]
    if cap.can_read_reports and REPORTS_SERVICE in running:
        scopes += [service_access_scope(REPORTS_SERVICE), REPORTS_READ_SCOPE]
    return scopes


def hub_roles(caps: Mapping[str, Capabilities], services: Iterable[str]) -> list[dict]:
    """``c.JupyterHub.load_roles``: the narrowed ``user`` role plus one role per group."""
    services = list(services)
    roles = [{"name": "user", "description": "Every Sekisho hub user (no servers by default)",
              "scopes": list(BASE_USER_SCOPES)}]
    for cap in caps.values():
        roles.append({
            "name": cap.hub_role,
            "description": f"Sekisho role {cap.role}",
            "scopes": scopes_for(cap, services),
            "groups": [cap.group],
        })
    # Nobody holds the hub's admin role (an empty list also revokes it from anyone who
    # was made admin through the API earlier).
    roles.append({"name": "admin", "users": [], "groups": [], "services": []})
    return roles


def server_token_scopes() -> list[str]:
    """Scopes requested for an analyst's server token ($JUPYTERHUB_API_TOKEN).

    The hub's defaults for a server (activity, access to this server) plus the guard.
    The hub grants only the subset the user holds, so the guard scope reaches the
    server of a role that may query, and no one else's.
    """
    return ["users:activity!user", "access:servers!server", service_access_scope(GUARD_SERVICE)]


def service_oauth_scopes(service: str) -> list[str]:
    """Scopes a service's OAuth tokens may carry (what the service checks explicitly)."""
    extra = {AUDIT_SERVICE: [AUDIT_REVIEW_SCOPE], REPORTS_SERVICE: [REPORTS_READ_SCOPE]}.get(service, [])
    return [service_access_scope(service), *extra]


def default_url_for(role: str | None, caps: Mapping[str, Capabilities], services: Iterable[str],
                    base_url: str = "/") -> str:
    """Where a person lands after login: their server, the audit pages, the reports."""
    cap = caps.get(role or "")
    running = set(services)
    if cap is None:
        return base_url + "hub/home"
    if cap.can_start_server:
        return base_url + "hub/spawn"
    if cap.can_review_audit and AUDIT_SERVICE in running:
        return base_url + f"services/{AUDIT_SERVICE}/"
    if cap.can_read_reports and REPORTS_SERVICE in running:
        return base_url + f"services/{REPORTS_SERVICE}/"
    return base_url + "hub/home"


def role_from_groups(groups: Iterable[str], mapping: Mapping[str, str]) -> str | None:
    """The Sekisho role of a person, from their identity provider's groups.

    ``mapping`` maps an IdP group (LDAP DN, Azure AD group id, OIDC group name) to a
    Sekisho role. A person in groups of two different roles is refused (None): roles
    separate duties (an analyst must not also review the audit of their own queries).
    """
    roles = {mapping[g] for g in groups if g in mapping}
    unknown = roles - set(HUMAN_ROLES)
    if unknown:
        raise ValueError(f"group mapping names unknown Sekisho role(s): {', '.join(sorted(unknown))}")
    return roles.pop() if len(roles) == 1 else None
