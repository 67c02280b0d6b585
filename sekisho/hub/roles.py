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

from sekisho.access import (
    AUDIT_SERVICE,
    GUARD_SERVICE,
    HUB_ADMIN_ROLE,
    HUMAN_ROLES,
    REPORTS_SERVICE,
    SERVICES,
    Capabilities,
    human_capabilities,
    load_policy_cached,
    service_access_scope,
)
from sekisho.instance import Instance

# What every logged-in hub user may do: see themselves, report activity, manage their
# own tokens (which can never exceed their own scopes). No servers, no sharing.
BASE_USER_SCOPES = ("read:users!user", "users:activity!user", "tokens!user")


def load_capabilities(instance: Instance) -> dict[str, Capabilities]:
    """Capabilities of each human role under the instance's policy in force."""
    return human_capabilities(load_policy_cached(instance.policy_path))


def scopes_for(cap: Capabilities, services: Iterable[str]) -> list[str]:
    """Hub scopes of a role; service scopes only for services the hub actually runs."""
    running = set(services)
    scopes: list[str] = []
    if cap.can_start_server:
        scopes += ["servers!user", "access:servers!user"]
    granted = {GUARD_SERVICE: cap.can_query, AUDIT_SERVICE: cap.can_review_audit,
               REPORTS_SERVICE: cap.can_read_reports}
    for name, allowed in granted.items():
        if allowed and name in running:
            scopes += SERVICES[name].oauth_scopes   # access to the service, and its custom scope
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
            "groups": [cap.hub_group],
        })
    # Nobody holds the hub's admin role (an empty list also revokes it from anyone who
    # was made admin through the API earlier).
    roles.append({"name": HUB_ADMIN_ROLE, "users": [], "groups": [], "services": []})
    return roles


def server_token_scopes() -> list[str]:
    """Scopes requested for an analyst's server token ($JUPYTERHUB_API_TOKEN).

    The hub's defaults for a server (activity, access to this server) plus the guard.
    The hub grants only the subset the user holds, so the guard scope reaches the
    server of a role that may query, and no one else's.
    """
    return ["users:activity!user", "access:servers!server", service_access_scope(GUARD_SERVICE)]


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
        return base_url + SERVICES[AUDIT_SERVICE].path.lstrip("/")
    if cap.can_read_reports and REPORTS_SERVICE in running:
        return base_url + SERVICES[REPORTS_SERVICE].path.lstrip("/")
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
