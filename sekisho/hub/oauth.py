"""OIDC / Azure AD (Entra ID) login for the Sekisho hub (production).

Roles come from the identity provider's group claim, read by OAuthenticator's
``manage_groups`` + ``auth_state_groups_key`` and mapped by ``group_roles``. See
docs/production-auth.md and the tested examples ``hub/auth_oidc.py`` and
``hub/auth_azuread.py``.
"""

from __future__ import annotations

from oauthenticator.azuread import AzureAdOAuthenticator
from oauthenticator.generic import GenericOAuthenticator
from traitlets import default

from sekisho.hub.auth import SekishoAuthMixin


class SekishoOAuthMixin(SekishoAuthMixin):
    @default("role_source")
    def _role_source_default(self):
        return "groups"

    @default("manage_groups")
    def _manage_groups_default(self):
        # needed for OAuthenticator to copy the group claim into auth_model["groups"];
        # Sekisho then replaces those groups with the one group of the mapped role
        return True


class SekishoGenericOAuthenticator(SekishoOAuthMixin, GenericOAuthenticator):
    """Any OpenID Connect provider (Keycloak, ADFS, Google Workspace, ...)."""


class SekishoAzureAdOAuthenticator(SekishoOAuthMixin, AzureAdOAuthenticator):
    """Microsoft Entra ID (Azure AD)."""
