"""LDAP / Active Directory login for the Sekisho hub (production).

Roles come from LDAP groups (``group_roles``); see docs/production-auth.md and the
tested example ``hub/auth_ldap.py``.
"""

from __future__ import annotations

from typing import Any

from ldapauthenticator import LDAPAuthenticator
from traitlets import default

from sekisho.hub.auth import SekishoAuthMixin, groups_from_ldap_auth_state


class SekishoLDAPAuthenticator(SekishoAuthMixin, LDAPAuthenticator):
    """ldapauthenticator's LDAPAuthenticator with Sekisho's audit and role gate."""

    @default("role_source")
    def _role_source_default(self):
        return "groups"

    @default("allowed_groups")
    def _allowed_groups_default(self):
        # ldapauthenticator looks up membership only of the groups listed here
        return list(self.group_roles)

    def idp_groups(self, auth_model: dict[str, Any]) -> list[str]:
        return groups_from_ldap_auth_state(auth_model)
