"""Test doubles for services built on sekisho.services.hubauth: a HubOAuth that knows a
fixed set of tokens (no hub needed) and the user models the hub would return."""

from __future__ import annotations

from typing import Any

from jupyterhub.services.auth import HubOAuth


class FixedHubOAuth(HubOAuth):
    """HubOAuth that knows a fixed set of tokens instead of asking a hub."""

    known: dict[str, dict] = {}

    def user_for_token(self, token, use_cache=True, session_id="", *, sync=True):
        async def lookup():
            return self.known.get(token)
        return lookup()


def user_model(name: str, *scopes: str, kind: str = "user") -> dict[str, Any]:
    """The model the hub returns for a token of ``name`` holding ``scopes``."""
    return {"kind": kind, "name": name, "scopes": list(scopes), "groups": []}
