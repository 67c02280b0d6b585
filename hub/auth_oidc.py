# Sekisho hub login through an OpenID Connect provider (Keycloak, ADFS, ...) (production example).
#
# Use: copy to /etc/sekisho/auth_oidc.py (root-owned, 0600), adapt the values marked
# ADAPT, and set in the instance's config.yaml:   hub: {auth_config: /etc/sekisho/auth_oidc.py}
# The client secret comes from the environment (systemd EnvironmentFile, root only).
# The provider must put the person's groups into the userinfo ("groups" claim).
# tests/test_hub_auth_config.py loads this file and checks the group -> role mapping.
from sekisho.hub.auth import secret_from_env
from sekisho.hub.oauth import SekishoGenericOAuthenticator

c = get_config()  # noqa: F821

ISSUER = "https://idp.city.himeji.example.lg.jp/realms/city"                 # ADAPT

c.JupyterHub.authenticator_class = SekishoGenericOAuthenticator
c.GenericOAuthenticator.client_id = "sekisho-hub"                              # ADAPT
c.GenericOAuthenticator.client_secret = secret_from_env("SEKISHO_OIDC_CLIENT_SECRET")
c.GenericOAuthenticator.oauth_callback_url = "https://sekisho.city.himeji.example.lg.jp/hub/oauth_callback"  # ADAPT
c.GenericOAuthenticator.authorize_url = f"{ISSUER}/protocol/openid-connect/auth"
c.GenericOAuthenticator.token_url = f"{ISSUER}/protocol/openid-connect/token"
c.GenericOAuthenticator.userdata_url = f"{ISSUER}/protocol/openid-connect/userinfo"
c.GenericOAuthenticator.scope = ["openid", "profile", "groups"]
c.GenericOAuthenticator.username_claim = "preferred_username"   # = the system user name
c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"

# Provider group -> Sekisho role (exactly one per person).
c.SekishoGenericOAuthenticator.group_roles = {                                 # ADAPT
    "/sekisho/analysts": "analyst",
    "/sekisho/auditors": "admin",
    "/sekisho/managers": "manager",
    "/sekisho/stewards": "steward",
}
