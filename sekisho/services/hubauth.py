"""Shared base for Sekisho's tornado services behind JupyterHub.

Every Sekisho service (guard, audit review, reports) is a JupyterHub *managed*
service running as the ``sekisho`` service account. This module gives them one way
to authenticate and authorise a request:

1. **Who**: ``HubOAuth`` (never ``HubAuth``: the two cannot be mixed in one process)
   identifies the hub user from ``Authorization: token ...`` (API clients such as an
   analyst's kernel) or from the service's own OAuth cookie (browsers).
2. **May they**: the user model's ``scopes`` are checked *explicitly* against the
   handler's ``required_scopes`` — ``HubOAuth.user_for_token`` alone only says who
   the token belongs to, not what it may do.
3. **As what**: the hub user name is mapped to their Sekisho role with
   ``sekisho.state.role_of``, and a handler may require a capability of that role
   (``required_capability``, a flag of ``sekisho.access.Capabilities``), read from the
   policy in force at each request. A person without a role is refused (fail closed).
4. **On record**: every request answered 401 or 403 — by these checks or by anything
   else (an XSRF failure, a handler's own 403) — goes through the application's
   ``sekisho.audit.DenialLog``: the first of its source and minute as the handler's
   ``denial_type`` entry (who, path, address, code), the rest counted into one
   ``access.denied`` aggregate per minute (see ``sekisho.audit.denials``).

Usage (a service module)::

    from sekisho.access import AUDIT_REVIEW_SCOPE, AUDIT_SERVICE
    from sekisho.services.hubauth import ServiceHandler, make_app, serve

    class Index(ServiceHandler):
        required_capability = "can_review_audit"
        required_scopes = frozenset({AUDIT_REVIEW_SCOPE})

        def get(self):
            self.write(f"hello {self.hub_user} ({self.sekisho_role})")

    def main():
        serve(AUDIT_SERVICE, lambda instance, env, address, port: HTTPServer(
            make_app(env["name"], [("", Index)], instance=instance, prefix=env["prefix"])
        ).listen(port, address))

``serve`` reads the environment the hub gives a managed service:
``JUPYTERHUB_SERVICE_NAME``, ``JUPYTERHUB_SERVICE_URL`` (where to listen),
``JUPYTERHUB_SERVICE_PREFIX`` (the URL prefix, e.g. ``/services/audit/``),
``JUPYTERHUB_API_TOKEN`` (read by HubOAuth itself) and ``SEKISHO_HOME``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from html import escape
from http import HTTPStatus
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated, check_scopes
from jupyterhub.utils import url_path_join
from tornado import ioloop, web

from sekisho.access import Capabilities, current_capabilities, service_access_scope, service_path
from sekisho.audit import Denial, DenialLog, credential_digest
from sekisho.audit.denials import UNAUTHENTICATED
from sekisho.instance import Instance, drop_to_service_account
from sekisho.state import role_of

log = logging.getLogger("sekisho.services")


class ServiceHandler(HubOAuthenticated, web.RequestHandler):
    """Base handler: authenticated hub user + explicit scope check + Sekisho role.

    Class attributes a subclass sets:

    * ``required_scopes``: every scope listed must be held (default: access to this
      service, ``access:services!service=<name>``);
    * ``required_capability``: a flag of ``sekisho.access.Capabilities`` the person's role
      must have under the policy in force (``None``: any role);
    * ``api``: ``True`` for JSON endpoints (401/403 as JSON, never a login redirect).

    After ``prepare`` the handler has ``hub_user`` (name), ``hub_user_model`` (the
    hub's user model, including the token's scopes) and ``sekisho_role``.
    """

    required_scopes: frozenset[str] | None = None
    required_capability: str | None = None
    api: bool = False
    denial_type: str = "access.denied"   # the audit entry type of a denial's first record

    hub_user: str
    hub_user_model: dict[str, Any]
    sekisho_role: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a misspelt capability would refuse everyone at request time; say so at import
        super().__init_subclass__(**kwargs)
        if cls.required_capability is not None and not hasattr(Capabilities, cls.required_capability):
            raise TypeError(f"{cls.__name__}.required_capability: {cls.required_capability!r} is not "
                            "a flag of sekisho.access.Capabilities")

    # ---- wiring ------------------------------------------------------------
    @property
    def hub_auth(self) -> HubOAuth:
        return self.settings["hub_auth"]

    @hub_auth.setter
    def hub_auth(self, value: HubOAuth) -> None:  # HubAuthenticated declares a setter
        raise AttributeError("hub_auth comes from the application settings")

    @property
    def instance(self) -> Instance:
        return self.settings["sekisho_instance"]

    @property
    def service_name(self) -> str:
        return self.settings["sekisho_service"]

    @property
    def effective_scopes(self) -> frozenset[str]:
        if self.required_scopes is not None:
            return frozenset(self.required_scopes)
        return frozenset({service_access_scope(self.service_name)})

    @property
    def hub_scopes(self) -> set[str]:
        # what HubAuthenticated.check_hub_user would check; we check the same set ourselves
        return set(self.effective_scopes)

    def get_login_url(self) -> str:
        if self.api:
            raise web.HTTPError(HTTPStatus.FORBIDDEN)  # API clients never follow a login redirect
        return super().get_login_url()

    def check_xsrf_cookie(self) -> None:
        # A request carrying an Authorization header cannot be forged by another site's
        # form, and is authenticated by that token alone (the cookie is then ignored).
        if self.hub_auth.auth_header_pat.match(self.request.headers.get("Authorization", "")):
            return
        super().check_xsrf_cookie()

    # ---- the check ---------------------------------------------------------
    async def prepare(self) -> None:
        model = await self.hub_auth.get_user(self, sync=False)
        if (model and self.request.headers.get("Authorization")
                and not getattr(self, "_token_authenticated", False)):
            model = None  # a token the hub rejected must not fall back to a cookie
        if not model:
            self._hub_auth_user_cache = None
            if self.api or self.request.method not in ("GET", "HEAD"):
                raise web.HTTPError(HTTPStatus.UNAUTHORIZED, "no valid hub token")
            self.redirect(self.get_login_url())
            return
        name = model.get("name")
        if model.get("kind", "user") != "user" or not name:
            self._deny(model, "not_a_person", "only people may use this service")
        missing = sorted(s for s in self.effective_scopes if not has_scopes(model, {s}))
        if missing:
            self._deny(model, "missing_scope", f"missing hub scope(s): {', '.join(missing)}")
        role = role_of(self.instance, name)
        if role is None:
            self._deny(model, "no_role", "no Sekisho role is registered for this user")
        capability = self.required_capability
        if capability is not None and not getattr(current_capabilities(self.instance.policy_path, role), capability):
            self._deny(model, "role_not_allowed", f"role {role!r} may not use this page ({capability})", role=role)
        self.hub_user = name
        self.hub_user_model = model
        self.sekisho_role = role
        self._hub_auth_user_cache = model
        self.current_user = model

    def _deny(self, model: dict[str, Any], code: str, message: str, role: str | None = None) -> None:
        self._hub_auth_user_cache = None
        self.denied_code = code
        try:
            self.on_denied(model, code, message, role)
            name = model.get("name")
            self.record_denial(HTTPStatus.FORBIDDEN, code, message, user=str(name) if name else None, role=role)
        finally:
            raise web.HTTPError(HTTPStatus.FORBIDDEN, f"{code}: {message}")

    def on_denied(self, model: dict[str, Any], code: str, message: str, role: str | None) -> None:
        """Hook called for each refused request (the service log); the audit record is
        ``record_denial``'s."""
        log.warning("%s: refused %s %s: %s", self.service_name, model.get("kind"), model.get("name"), message)

    # ---- denials on record ------------------------------------------------------
    @property
    def denials(self) -> DenialLog:
        return self.settings["sekisho_denials"]

    def record_denial(self, status: int, code: str, why: str = "", *, user: str | None = None,
                      role: str | None = None) -> None:
        """Put this request's denial on record (aggregated per source and minute: see
        ``sekisho.audit.denials``). The request is refused either way; a denial that cannot
        be audited is said in the service log."""
        if getattr(self, "_denial_recorded", False):
            return
        self._denial_recorded = True
        match = self.hub_auth.auth_header_pat.match(self.request.headers.get("Authorization", "")) \
            if user else None
        denial = Denial(status=int(status), code=code, path=self.request.path, route=type(self).__name__,
                        user=user[:64] if user else None, role=role, remote_ip=self.request.remote_ip,
                        credential=credential_digest(match.group(1)) if match else None, why=why)
        try:
            self.denials.record(denial, first=self.denial_entry)
        except Exception as exc:
            log.error("%s: cannot audit a denial (%s %s %s): %s", self.service_name, user, code,
                      self.request.path[:200], exc)

    def denial_entry(self, denial: Denial) -> dict[str, Any]:
        """The audit entry of the first denial of its bucket (``denial_type``)."""
        return self.instance.audit.append(
            self.denial_type, user=denial.user or UNAUTHENTICATED, role=denial.role, outcome="denied",
            summary=f"{self.service_name}: {denial.status} {denial.code}",
            details=self.denials.details(denial))

    def on_finish(self) -> None:
        # any 401/403 not recorded by the checks above (no token, XSRF, a handler's own 403)
        status = self.get_status()
        if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) and not getattr(self, "_denial_recorded", False):
            code = getattr(self, "denied_code", None) or ("unauthenticated" if status == 401 else "forbidden")
            self.record_denial(status, code, self._reason, user=getattr(self, "hub_user", None),
                               role=getattr(self, "sekisho_role", None))
        super().on_finish()

    # ---- errors --------------------------------------------------------------
    ERROR_TEXT_JA = {
        401: "ログインが必要です。",
        403: "このページを利用する権限がありません。",
        404: "ページが見つかりません。",
    }

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        detail = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else ""
        ja = self.ERROR_TEXT_JA.get(status_code, "エラーが発生しました。")
        if self.api or "application/json" in self.request.headers.get("Accept", ""):
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps({"status": status_code, "message_ja": ja, "message": detail},
                                   ensure_ascii=False))
            return
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(_error_page(status_code, ja, detail))


def _error_page(status: int, ja: str, detail: str) -> str:
    return (
        "<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\">"
        f"<title>{status} — 関所</title></head><body style=\"font-family: sans-serif; margin: 2em\">"
        f"<h1>{status}</h1><p>{escape(ja)}</p>"
        + (f"<p><small>{escape(detail)}</small></p>" if detail else "")
        + "<p><a href=\"/hub/home\">ハブのホームへ戻る / back to the hub</a></p></body></html>"
    )


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """The hub's OAuth callback, bound to the application's HubOAuth (not a singleton)."""

    @property
    def hub_auth(self) -> HubOAuth:
        return self.settings["hub_auth"]

    @hub_auth.setter
    def hub_auth(self, value: HubOAuth) -> None:
        raise AttributeError("hub_auth comes from the application settings")


# ---- application -------------------------------------------------------------

Route = tuple[str, type[web.RequestHandler]] | tuple[str, type[web.RequestHandler], dict[str, Any]]


def make_app(service: str, routes: Sequence[Route], *, instance: Instance, prefix: str,
             hub_auth: HubOAuth | None = None, denials: DenialLog | None = None,
             **settings: Any) -> web.Application:
    """Build the tornado application of ``service``.

    ``routes`` are relative to ``prefix`` (``""`` is the service's index page). The
    OAuth callback is added at ``<prefix>oauth_callback``. ``denials``: where 401/403
    answers are recorded (default: a new ``DenialLog`` of ``service`` into the instance's
    audit trail).
    """
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    if hub_auth is None:
        hub_auth = HubOAuth(api_token=os.environ["JUPYTERHUB_API_TOKEN"], cache_max_age=60)
    handlers: list[Any] = [(url_path_join(prefix, "oauth_callback"), OAuthCallbackHandler)]
    for route in routes:
        pattern, handler, *kwargs = route
        handlers.append((prefix + pattern.lstrip("/"), handler, *kwargs))
    if prefix != "/":
        handlers.append((prefix.rstrip("/"), web.RedirectHandler, {"url": prefix}))
    return web.Application(
        handlers,
        hub_auth=hub_auth,
        sekisho_instance=instance,
        sekisho_service=service,
        sekisho_denials=denials if denials is not None else DenialLog(instance.audit, service),
        # fresh per process: a restarted service just sends browsers through OAuth again
        cookie_secret=secrets.token_bytes(32),
        xsrf_cookies=True,
        **settings,
    )


def service_environment(service: str | None = None) -> dict[str, str]:
    """The hub-provided settings of a managed service, with clear errors when missing."""
    missing = [k for k in ("JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_API_TOKEN") if not os.environ.get(k)]
    if missing:
        raise SystemExit(f"sekisho service {service or ''}: {', '.join(missing)} not set "
                         "(this program is started by JupyterHub as a managed service)")
    name = os.environ.get("JUPYTERHUB_SERVICE_NAME") or service
    return {
        "name": name,
        "url": os.environ["JUPYTERHUB_SERVICE_URL"],
        "prefix": os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or service_path(name),
        "home": os.environ.get("SEKISHO_HOME", ""),
    }


def serve(service: str, start: Callable[[Instance, dict[str, str], str, int], Any]) -> None:
    """Entry point shared by the managed services: log, run as the service account, open
    the instance the hub named, let ``start(instance, env, address, port)`` listen on the
    address the hub gave the service, and serve until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    drop_to_service_account()  # a no-op under the hub's `user: sekisho`; never serve as root
    env = service_environment(service)
    instance = Instance.open(env["home"] or None)
    url = urlparse(env["url"])
    start(instance, env, url.hostname or "127.0.0.1", url.port or 80)
    log.info("%s service listening on %s (prefix %s, instance %s, pid %d)", env["name"], env["url"],
             env["prefix"], instance.home, os.getpid())
    ioloop.IOLoop.current().start()


def scopes_of(model: dict[str, Any]) -> set[str]:
    return set(model.get("scopes", []))


def has_scopes(model: dict[str, Any], required: Iterable[str]) -> bool:
    """True when ``model`` holds every scope in ``required`` (filters resolved by the hub's rules)."""
    have = scopes_of(model)
    return all(check_scopes({s}, have) for s in required)
