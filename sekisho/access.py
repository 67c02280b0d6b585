"""Who may do what: Sekisho's roles, the services people reach, and what each role may do.

This is the one place that names a role or a service and the one place that turns the
policy's ``roles:`` section into permissions, so the hub, the services, the guard, the
client, the CLI and the demo cannot disagree about them:

* **roles** — the four human roles and the service identity that publishes reports, their
  Japanese labels and their hub groups (``analysts``, ``admins``, ...);
* **services** — the hub-managed services (guard, audit review, reports): name, the
  module the hub runs, title, default port, the custom scope a token needs, and the
  scope that lets a token reach them;
* **capabilities** — :func:`capabilities` reads one role out of a loaded policy: its
  views and modes, and whether it may upload, start a server, review the audit trail,
  read or publish reports;
* **the policy in force** — :func:`load_policy_cached` reloads a policy file when it
  changes (modification time, size and inode), so a long-running service follows a
  policy change at its next request instead of disagreeing with the CLI until restarted.

It imports only the policy loader: every layer above may use it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from sekisho.policy import Policy, load_policy

# ---- roles ---------------------------------------------------------------------------

STEWARD = "steward"    # uploads source exports; reads nothing
ANALYST = "analyst"    # queries the views through the guard in JupyterLab
ADMIN = "admin"        # reviews the audit trail (not a hub admin)
MANAGER = "manager"    # reads the published reports
REPORTS = "reports"    # the service identity that runs the report notebooks

HUMAN_ROLES = (STEWARD, ANALYST, ADMIN, MANAGER)   # roles a person can log in with
ROLES = (*HUMAN_ROLES, REPORTS)                     # every role the registry may hold

#: registry name of the report service identity (it holds the role ``REPORTS``); a person
#: may never be given this name
REPORTS_USER = "reports"

ROLE_LABELS_JA = {
    STEWARD: "データ管理者",
    ANALYST: "分析者",
    ADMIN: "監査者",
    MANAGER: "管理職",
    REPORTS: "定型レポート",
}

#: role -> hub group (plural, as people say it); the hub role bound to the group is
#: ``HUB_ROLE_PREFIX + role``, so Sekisho's "admin" is never the hub's built-in "admin"
HUB_GROUPS = {ANALYST: "analysts", ADMIN: "admins", MANAGER: "managers", STEWARD: "stewards"}
HUB_ROLE_PREFIX = "sekisho-"
#: JupyterHub's built-in all-powerful role; the hub configuration gives it to nobody
HUB_ADMIN_ROLE = "admin"


def role_label(role: str | None) -> str:
    """The Japanese label of ``role`` (the name itself for a role Sekisho does not know)."""
    return ROLE_LABELS_JA.get(role or "", role or "")


# ---- services and scopes ---------------------------------------------------------------

GUARD_SERVICE = "guard"
AUDIT_SERVICE = "audit"
REPORTS_SERVICE = "reports"

# Custom hub scopes: holding one is what makes a hub user an audit reviewer / a reader of
# reports (the hub grants them per role, sekisho.hub.roles; the services check them).
AUDIT_REVIEW_SCOPE = "custom:sekisho:audit-review"
REPORTS_READ_SCOPE = "custom:sekisho:reports-read"
CUSTOM_SCOPES = {
    AUDIT_REVIEW_SCOPE: {"description": "Sekisho: review the audit trail (監査ログの閲覧)"},
    REPORTS_READ_SCOPE: {"description": "Sekisho: read published reports (公表レポートの閲覧)"},
}


@dataclass(frozen=True)
class Service:
    """A hub-managed Sekisho service, as the hub configures it and people reach it."""

    name: str                        # registered in the hub; the URL segment /services/<name>/
    module: str                      # what the hub runs: ``python -m <module>``
    title_ja: str                    # shown on the hub's home page
    default_port: int                # loopback port unless config.yaml hub.service_ports says otherwise
    page: bool                       # a page for people (False: an API used by kernels)
    custom_scope: str | None = None  # needed besides access to the service

    @property
    def path(self) -> str:
        return service_path(self.name)

    @property
    def access_scope(self) -> str:
        return service_access_scope(self.name)

    @property
    def oauth_scopes(self) -> list[str]:
        """Scopes the service's OAuth tokens may carry (what the service checks explicitly)."""
        return [self.access_scope, *([self.custom_scope] if self.custom_scope else [])]


SERVICES: dict[str, Service] = {s.name: s for s in (
    Service(GUARD_SERVICE, "sekisho.services.guard", "集計照会 (guard)", 8091, page=False),
    Service(AUDIT_SERVICE, "sekisho.services.audit_review", "監査ログ (audit)", 8092, page=True,
            custom_scope=AUDIT_REVIEW_SCOPE),
    Service(REPORTS_SERVICE, "sekisho.services.reports", "公表レポート (reports)", 8093, page=True,
            custom_scope=REPORTS_READ_SCOPE),
)}


def service_path(service: str) -> str:
    """Where the hub serves ``service``, below its base URL (the proxy routes it there)."""
    return f"/services/{service}/"


def service_access_scope(service: str) -> str:
    """The hub scope that lets a token reach ``/services/<service>/``."""
    return f"access:services!service={service}"


# ---- capabilities ------------------------------------------------------------------------

@dataclass(frozen=True)
class Capabilities:
    """What one role may do, read from the policy in force (``capabilities``)."""

    role: str | None
    views: tuple[str, ...] = ()          # views it may query through the guard
    modes: tuple[str, ...] = ()          # protection modes it may ask for
    default_mode: str | None = None
    can_ingest: bool = False             # upload source exports (sekisho ingest)
    can_start_server: bool = False       # a JupyterLab server of its own
    can_review_audit: bool = False       # the audit review pages; lifting holds after review
    can_read_reports: bool = False       # the published reports
    condition_influence: bool = True     # the guard's condition-influence rule applies to it
    alert_holds: bool = True             # an alert may put its users on hold

    @property
    def can_query(self) -> bool:
        return bool(self.views)

    @property
    def can_publish_reports(self) -> bool:
        """Publishing reports is a duty of the people who run the instance: those who
        upload its data or review its audit trail (stewards and admins)."""
        return self.can_ingest or self.can_review_audit

    @property
    def hub_group(self) -> str | None:
        return HUB_GROUPS.get(self.role or "")

    @property
    def hub_role(self) -> str:
        return HUB_ROLE_PREFIX + str(self.role)


def capabilities(policy: Policy, role: str | None) -> Capabilities:
    """What ``role`` may do under ``policy``; nothing at all for no role (a person who is
    not registered) or a role the policy does not define."""
    spec = policy.roles.get(role) if role else None
    if spec is None:
        return Capabilities(role=role)
    return Capabilities(role=role, views=tuple(spec.views), modes=tuple(spec.modes),
                        default_mode=spec.default_mode, can_ingest=spec.can_ingest,
                        can_start_server=spec.can_start_server, can_review_audit=spec.can_review_audit,
                        can_read_reports=spec.can_read_reports,
                        condition_influence=spec.condition_influence, alert_holds=spec.alert_holds)


def human_capabilities(policy: Policy) -> dict[str, Capabilities]:
    """Capabilities of each human role the policy defines (a role it leaves out gets no
    hub group and no scopes)."""
    return {role: capabilities(policy, role) for role in HUMAN_ROLES if role in policy.roles}


# ---- the policy in force -------------------------------------------------------------------

_policies: dict[str, tuple[tuple[int, int, int], Policy]] = {}
_policies_lock = threading.Lock()


def load_policy_cached(path: str | os.PathLike) -> Policy:
    """``sekisho.policy.load_policy(path)``, loaded again only when the file changed.

    Services ask on every request (one ``stat``), so an edited or replaced policy takes
    effect at the next request. The key is the file's modification time, size and inode
    (``os.replace`` of an edited copy gives a new inode even within one clock tick).
    An invalid new policy raises ``PolicyError`` and is not cached.
    """
    # keyed on the path as given: ``stat`` follows links, and the version below changes
    # with the file it reaches (resolving the path cost more than the rest of the call)
    key = os.fspath(path)
    stat = os.stat(key)
    version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    with _policies_lock:
        cached = _policies.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    policy = load_policy(path)
    with _policies_lock:
        _policies[key] = (version, policy)
    return policy


def current_capabilities(policy_path: str | os.PathLike, role: str | None) -> Capabilities:
    """What ``role`` may do under the policy file in force (``Instance.policy_path``)."""
    return capabilities(load_policy_cached(policy_path), role)
