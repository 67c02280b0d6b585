"""The hub's own 401/403 answers on record.

JupyterHub logs every request it answers through one function, its tornado setting
``log_function`` (``jupyterhub.log.log_request``). ``HubDenialLog`` wraps that function
(``c.JupyterHub.tornado_settings["log_function"]``, set by ``sekisho.hub.config``): it
logs exactly as before, and a request the hub answered 401 or 403 — an API call with a bad
or insufficient token, a person opening another person's server, a page their role may
not see — is put on record in the audit trail through ``sekisho.audit.DenialLog``: the
first of its source and minute as an ``access.denied`` entry (who if the hub knows them,
the path, the address, the handler), the others counted into one aggregate entry per
minute, so an unauthenticated flood cannot swamp the chain.

Failed logins are not recorded here: the authenticator already records each as
``login.failed`` (``sekisho.hub.auth``), with the name that was typed.
"""

from __future__ import annotations

import logging
from typing import Any

from jupyterhub.handlers.login import LoginHandler
from jupyterhub.log import log_request

from sekisho.audit import Denial, DenialLog, credential_digest
from sekisho.instance import Instance
from sekisho.state import role_of

log = logging.getLogger("sekisho.hub")

HUB_SERVICE = "hub"
TOKEN_HEADER = ("token ", "bearer ")


def _user_name(handler: Any) -> str | None:
    """The hub user the request was made as, if the hub identified one (without raising)."""
    try:
        user = handler.current_user
    except Exception:
        return None
    if user is None:
        return None
    if isinstance(user, dict):
        return str(user.get("name") or "") or None
    return str(getattr(user, "name", "") or "") or None


def _token(handler: Any) -> str | None:
    header = handler.request.headers.get("Authorization", "")
    for prefix in TOKEN_HEADER:
        if header.lower().startswith(prefix):
            return header[len(prefix):].strip() or None
    return None


class HubDenialLog:
    """The hub's ``log_function``: JupyterHub's own request log, plus denials on record."""

    def __init__(self, instance: Instance, *, denials: DenialLog | None = None, log_function=log_request):
        self.instance = instance
        self.denials = denials if denials is not None else DenialLog(instance.audit, HUB_SERVICE)
        self.log_function = log_function

    def __deepcopy__(self, memo: dict) -> HubDenialLog:
        # traitlets deep-copies configuration values; the hub has one denial log (its
        # buckets, lock and flush thread), so a copy is this object itself
        return self

    def __copy__(self) -> HubDenialLog:
        return self

    def __call__(self, handler: Any) -> None:
        try:
            self.log_function(handler)
        finally:
            self.record(handler)

    def record(self, handler: Any) -> dict[str, Any] | None:
        """Put the hub's answer to ``handler``'s request on record if it was a denial."""
        status = handler.get_status()
        if status not in (401, 403):
            return None
        if isinstance(handler, LoginHandler):
            return None   # a failed login is already login.failed (the name typed, the address)
        user = _user_name(handler)
        role = None
        if user is not None:
            try:
                role = role_of(self.instance, user)
            except Exception:   # the registry unreadable: the denial is recorded without a role
                role = None
        denial = Denial(status=status, code="unauthenticated" if status == 401 else "forbidden",
                        path=handler.request.path, route=type(handler).__name__, user=user, role=role,
                        remote_ip=handler.request.remote_ip,
                        credential=credential_digest(_token(handler)) if user else None,
                        why=f"{handler.request.method} {getattr(handler, '_reason', '')}".strip())
        try:
            return self.denials.record(denial)
        except Exception as exc:   # the request was refused either way; make the gap visible
            log.error("cannot audit a hub denial (%s %s %s): %s", status, user, denial.path[:200], exc)
            return None
