"""The guard service's request handling: authentication of the hub token (malformed
headers refused before the hub sees them), the explicit scope and role checks of
``sekisho.services.hubauth``, audited denials, the error envelope of every failure, and
``ApiHandler.guarded``, which calls the guard on the service's worker pool and answers its
refusals. The endpoints themselves are in ``sekisho.services.guard``."""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any, Callable

from tornado import web

from sekisho.audit import AuditError, Denial
from sekisho.instance import Instance
from sekisho.protocol import JSON_CONTENT, SUMMARY_HEADER, ErrorEnvelope, jsonable
from sekisho.resources import resource_dir
from sekisho.services.guard_pool import PoolBusy
from sekisho.services.guard_wire import EncodingFailed
from sekisho.services.hubauth import ServiceHandler

if TYPE_CHECKING:
    from sekisho.services.guard import GuardService

log = logging.getLogger("sekisho.services.guard")

# Hub tokens are URL-safe; anything else cannot be a token and is refused before the hub sees it.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{8,512}")
AUTH_HEADER_PATTERN = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)
OPENAPI_FILE = resource_dir("hub") / "guard-openapi.yaml"


# ---------------------------------------------------------------------------
# Authorization (authentication and the explicit scope check are sekisho.services.hubauth's)


def audit_denial(instance: Instance, user: str | None, role: str | None, endpoint: str,
                 code: str, why: str, **extra: Any) -> dict[str, Any]:
    """Record a refused request (bad token, missing scope, no role, role without views)."""
    return instance.audit.append(
        "query.refused", user=user or "(unauthenticated)", role=role, outcome="denied",
        summary=f"guard service denied {endpoint}: {code}",
        details={"endpoint": endpoint, "code": code, "why": why, "via": "guard-service", **extra})


# ---------------------------------------------------------------------------
# Handlers

INTERNAL_ERROR = ErrorEnvelope("internal_error", "the guard failed; see the service log / 関所の内部エラーです")
BUSY = ErrorEnvelope("guard_busy", "混み合っているため実行できませんでした。しばらくしてから再度実行してください "
                                   "/ the guard is busy with other queries; try again shortly")


class ApiHandler(ServiceHandler):
    """Authenticated (hub token + explicit scope + a Sekisho role that may query), JSON errors."""

    api = True
    endpoint = "?"
    required_capability = "can_query"

    @property
    def service(self) -> GuardService:
        return self.settings["guard_service"]

    async def prepare(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        header = self.request.headers.get("Authorization")
        if header is not None:
            match = AUTH_HEADER_PATTERN.fullmatch(header.strip())
            if not match or not TOKEN_PATTERN.fullmatch(match.group(1)):
                # never forwarded to the hub: it cannot be a hub token
                self._invalid_token("malformed Authorization header")
        try:
            await super().prepare()
        except web.HTTPError as e:
            if e.status_code == 401 and header is not None:
                self._invalid_token("the hub did not accept the token")
            raise

    def _invalid_token(self, why: str) -> None:
        self.denied_code = "invalid_token"
        self.record_denial(403, "invalid_token", why)
        raise web.HTTPError(403, "invalid_token: the token is not valid")

    def denial_entry(self, denial: Denial) -> dict[str, Any]:
        """The first denial of its source and minute: ``query.refused`` (outcome ``denied``),
        as every refusal at the guard (see ``sekisho.audit.denials`` for the rest)."""
        return audit_denial(self.instance, denial.user, denial.role, self.endpoint, denial.code, denial.why,
                            path=denial.path[:200], status=denial.status, source=denial.source,
                            remote_ip=denial.remote_ip)

    # errors tornado raises (body too large, no such method ...) -> the code that names them;
    # sekisho.protocol.status_for maps each code back to the same status
    ERRORS = {
        400: ("bad_request", "bad request / リクエストが正しくありません"),
        401: ("unauthenticated", "missing 'Authorization: token <hub token>' header "
                                 "/ ハブのトークンが必要です"),
        403: ("forbidden", "not allowed / 権限がありません"),
        404: ("not_found", "no such endpoint / そのような API はありません"),
        405: ("method_not_allowed", "method not allowed / このメソッドは使えません"),
        413: ("too_large", "request body too large / 本文が大きすぎます"),
    }
    DENIAL_TEXT_JA = {
        "invalid_token": "トークンが無効です",
        "not_a_person": "利用者本人のトークンが必要です",
        "missing_scope": "このトークンには関所サービスへのアクセス権がありません",
        "no_role": "関所の利用者として登録されていません",
        "role_not_allowed": "この役割ではデータを照会できません",
    }

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        code, reason = self.ERRORS.get(status_code, (INTERNAL_ERROR.code, INTERNAL_ERROR.reason))
        denied = getattr(self, "denied_code", None)
        if status_code == 403 and denied:
            detail = exc.log_message.split(": ", 1)[-1] if isinstance(exc, web.HTTPError) and exc.log_message else denied
            code, reason = denied, f"{detail} / {self.DENIAL_TEXT_JA.get(denied, '権限がありません')}"
        elif isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
            reason = f"{exc.log_message} / {reason.split(' / ')[-1]}"
        # the status tornado chose (it may be one the protocol has no code for, e.g. 411)
        self.send_error_envelope(ErrorEnvelope(code, reason), status=status_code)

    def send_error_envelope(self, error: ErrorEnvelope, status: int | None = None) -> None:
        self.clear_header(SUMMARY_HEADER)
        self.set_status(status or error.status)
        self.set_header("Content-Type", JSON_CONTENT)
        self.finish(json.dumps(error.to_json(), ensure_ascii=False))

    def send_json(self, data: Any) -> None:
        self.set_header("Content-Type", JSON_CONTENT)
        self.finish(json.dumps(jsonable(data), ensure_ascii=False))

    async def guarded(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the guard on a worker thread: ``guard.<method>(*args, **kwargs)``, or
        ``method(guard, *args)`` for a callable. A refusal, an audit failure, a busy pool or
        a bug is answered here (its status from ``sekisho.protocol``) and ``None`` returned."""
        pool = self.service.pool
        try:
            if callable(method):
                return await pool.run(self.hub_user, lambda: method(pool.guard(), *args))
            return await pool.call(self.hub_user, method, *args, **kwargs)
        except self.service.refusal_types as e:
            part = getattr(e, "part", None)
            self.send_error_envelope(ErrorEnvelope(str(getattr(e, "code", "refused")), str(getattr(e, "reason", e)),
                                                   None if part is None else str(part)))
        except AuditError:
            self.send_error_envelope(ErrorEnvelope(
                "audit_unavailable", "the audit log cannot be written; nothing was done "
                                     "/ 監査ログに書き込めないため処理しません"))
        except PoolBusy as e:
            self.busy(e)
        except EncodingFailed as e:
            log.error("encoding an answer for %s failed (audit seq %s)", self.hub_user, e.seq, exc_info=e.__cause__)
            self.send_error_envelope(INTERNAL_ERROR)
        except Exception:
            # a bug: the guard records what it audited itself; no answer seq exists yet
            name = method if isinstance(method, str) else getattr(method, "guard_method", method.__name__)
            log.exception("guard.%s for %s failed (%s; no audit seq is known)", name, self.hub_user, self.endpoint)
            self.send_error_envelope(INTERNAL_ERROR)
        return None

    def busy(self, e: PoolBusy) -> None:
        """No worker thread within the guard's query time: ``guard_busy`` (503), as the
        guard's own admission answers. The request never reached the guard, so a query is
        audited here (every query asked is on record)."""
        log.warning("%s of %s waited %.1f s for a worker thread: guard_busy", self.endpoint, self.hub_user, e.waited)
        sql = getattr(self, "sql", None)
        if sql is not None:
            try:
                self.instance.audit.append(
                    "query.refused", user=self.hub_user, role=self.sekisho_role, outcome="refused",
                    summary="refused: guard_busy",
                    details={"sql": sql, "decision": "refused", "code": "guard_busy", "endpoint": self.endpoint,
                             "waited_s": round(e.waited, 1), "via": "guard-service"})
            except Exception as err:   # refused either way; say so in the service log
                log.error("cannot audit a busy refusal for %s: %s", self.hub_user, err)
        self.send_error_envelope(BUSY)



class OpenApiHandler(web.RequestHandler):
    """The API description itself (public: it holds no data)."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=utf-8")
        self.finish(OPENAPI_FILE.read_bytes())


class NotFoundHandler(web.RequestHandler):
    def prepare(self) -> None:
        error = ErrorEnvelope("not_found", "no such endpoint / そのような API はありません")
        self.set_status(error.status)
        self.set_header("Content-Type", JSON_CONTENT)
        self.finish(json.dumps(error.to_json(), ensure_ascii=False))
