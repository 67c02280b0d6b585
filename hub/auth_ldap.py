# Sekisho hub login through LDAP / Active Directory (production example).
#
# Use: copy to /etc/sekisho/auth_ldap.py (root-owned, 0600), adapt the values marked
# ADAPT, and set in the instance's config.yaml:   hub: {auth_config: /etc/sekisho/auth_ldap.py}
# The bind password comes from the environment (systemd EnvironmentFile, root only).
# People still need a system user of the same name on the hub host (SSSD/realmd join,
# or `sekisho users add NAME --role ROLE --adopt`), because their server runs as them.
# tests/test_hub_auth_config.py loads this file and checks the group -> role mapping.
from sekisho.hub.auth import secret_from_env
from sekisho.hub.ldap import SekishoLDAPAuthenticator

c = get_config()  # noqa: F821

c.JupyterHub.authenticator_class = SekishoLDAPAuthenticator

c.LDAPAuthenticator.server_address = "ad.city.himeji.example.lg.jp"        # ADAPT
c.LDAPAuthenticator.server_port = 636
c.LDAPAuthenticator.tls_strategy = "on_connect"                            # LDAPS
c.LDAPAuthenticator.lookup_dn = True
c.LDAPAuthenticator.lookup_dn_search_user = "CN=sekisho-bind,OU=Service,DC=city,DC=himeji,DC=example"  # ADAPT
c.LDAPAuthenticator.lookup_dn_search_password = secret_from_env("SEKISHO_LDAP_BIND_PASSWORD")
c.LDAPAuthenticator.user_search_base = "OU=Staff,DC=city,DC=himeji,DC=example"                       # ADAPT
c.LDAPAuthenticator.user_attribute = "sAMAccountName"
c.LDAPAuthenticator.lookup_dn_user_dn_attribute = "cn"
c.LDAPAuthenticator.bind_dn_template = []
c.LDAPAuthenticator.use_lookup_dn_username = False  # keep the login name (= the system user)
c.LDAPAuthenticator.auth_state_attributes = ["memberOf"]

# Directory group -> Sekisho role. Exactly one role per person: someone in two of these
# groups is refused (an analyst must not review the audit of their own queries).
c.SekishoLDAPAuthenticator.group_roles = {                                   # ADAPT
    "CN=sekisho-analysts,OU=Groups,DC=city,DC=himeji,DC=example": "analyst",
    "CN=sekisho-auditors,OU=Groups,DC=city,DC=himeji,DC=example": "admin",
    "CN=sekisho-managers,OU=Groups,DC=city,DC=himeji,DC=example": "manager",
    "CN=sekisho-stewards,OU=Groups,DC=city,DC=himeji,DC=example": "steward",
}
