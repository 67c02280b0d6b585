# JupyterHub configuration of a Sekisho instance. Start it with `sekisho hub` (as root).
#
# Everything is derived from the instance ($SEKISHO_HOME, config.yaml: hub) and the
# policy's roles by sekisho.hub.config.configure; read that module for what is set.
# Production identity providers (LDAP, OIDC, Azure AD): set `hub.auth_config` in the
# instance's config.yaml to one of the example files next to this one (adapted), see
# docs/production-auth.md.
import os

from sekisho.hub.config import configure

c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)
settings = configure(c, os.environ.get("SEKISHO_HOME") or None)
if settings.auth_config:
    load_subconfig(settings.auth_config)  # noqa: F821
