# Sekisho hub login through Microsoft Entra ID (Azure AD) (production example).
#
# Use: copy to /etc/sekisho/auth_azuread.py (root-owned, 0600), adapt the values marked
# ADAPT, and set in the instance's config.yaml:   hub: {auth_config: /etc/sekisho/auth_azuread.py}
# In the app registration, emit security groups in the ID token (token configuration ->
# groups claim -> "Security groups", group IDs). The client secret comes from the
# environment (systemd EnvironmentFile, root only).
# tests/test_hub_auth_config.py loads this file and checks the group -> role mapping.
from sekisho.hub.auth import secret_from_env
from sekisho.hub.oauth import SekishoAzureAdOAuthenticator

c = get_config()  # noqa: F821

c.JupyterHub.authenticator_class = SekishoAzureAdOAuthenticator
c.AzureAdOAuthenticator.tenant_id = "00000000-0000-0000-0000-000000000000"     # ADAPT
c.AzureAdOAuthenticator.client_id = "11111111-1111-1111-1111-111111111111"     # ADAPT
c.AzureAdOAuthenticator.client_secret = secret_from_env("SEKISHO_AZUREAD_CLIENT_SECRET")
c.AzureAdOAuthenticator.oauth_callback_url = "https://sekisho.city.himeji.example.lg.jp/hub/oauth_callback"  # ADAPT
c.AzureAdOAuthenticator.scope = ["openid", "profile", "email"]


def system_user_name(user: dict) -> str:
    """tanaka.taro@city.himeji.example.lg.jp -> tanaka.taro (the system user on the hub host)."""
    return str(user["preferred_username"]).split("@", 1)[0].lower()


c.AzureAdOAuthenticator.username_claim = system_user_name
c.AzureAdOAuthenticator.manage_groups = True
c.AzureAdOAuthenticator.auth_state_groups_key = "user.groups"  # the ID token's "groups" claim

# Entra ID security group (object ID) -> Sekisho role (exactly one per person).
c.SekishoAzureAdOAuthenticator.group_roles = {                                  # ADAPT
    "6f1c2a9e-0000-4000-8000-00000000a001": "analyst",
    "6f1c2a9e-0000-4000-8000-00000000a002": "admin",
    "6f1c2a9e-0000-4000-8000-00000000a003": "manager",
    "6f1c2a9e-0000-4000-8000-00000000a004": "steward",
}
