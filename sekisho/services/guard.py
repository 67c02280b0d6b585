"""The guard service: the query guard behind HTTP, as a JupyterHub managed service.

Run as ``python -m sekisho.services.guard`` by the hub (as the ``sekisho`` service
account). The API is documented in ``hub/guard-openapi.yaml``::

    POST {prefix}api/query     {sql, mode, epsilon, format}  -> Arrow IPC stream or JSON
    POST {prefix}api/describe  {sql}                         -> result schema, no data
    GET  {prefix}api/views                                   -> the caller's views
    GET  {prefix}api/budget                                  -> the caller's budget

Every request is authenticated with the hub (``Authorization: token ...``); the token
must carry the scope ``access:services!service=<service name>`` (checked explicitly here:
``HubAuth.user_for_token`` does not check scopes), the hub user must be a Sekisho user
whose role has views. Authorization denials are audited here; queries are audited by the
guard itself. Guard calls run in a thread pool over one shared ``Guard``, which follows the
store's ``CURRENT`` pointer: a new ingest becomes visible at the next query while
in-flight queries keep the snapshot they started on.

What travels on the wire — endpoints, content types, the summary's two copies (Arrow
schema metadata and the ``X-Sekisho-Summary`` header), the request envelope, the error
body and the HTTP status of every code — is ``sekisho.protocol``, shared with the ibis
client. This module parses the envelope only: the guard validates the SQL, the mode and
ε itself (for every entry point alike) and refuses with its own codes. A failure that is
not Sekisho's own (a bug) is logged here with its traceback and answered
``internal_error``, without details.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ibis.expr.datatypes as dt
import pyarrow as pa
from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.access import GUARD_SERVICE, SERVICES
from sekisho.audit import AuditError
from sekisho.guard import Guard, QueryRefused
from sekisho.instance import Instance
from sekisho.protocol import (ARROW_STREAM, BUDGET_PATH, DESCRIBE_PATH, JSON_CONTENT, MAX_BODY_BYTES,
                              OPENAPI_PATH, QUERY_PATH, SUMMARY_HEADER, SUMMARY_METADATA_KEY, VIEWS_PATH,
                              DescribeRequest, ErrorEnvelope, QueryRequest, RequestError, encode_summary,
                              jsonable, summary_header)
from sekisho.resources import resource_dir
from sekisho.services.hubauth import ServiceHandler, make_app, serve

log = logging.getLogger("sekisho.services.guard")

# Hub tokens are URL-safe; anything else cannot be a token and is refused before the hub sees it.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{8,512}")
AUTH_HEADER_PATTERN = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)
OPENAPI_FILE = resource_dir("hub") / "guard-openapi.yaml"


# ---------------------------------------------------------------------------
# Encoding results


def schema_json(schema: pa.Schema) -> list[dict[str, str]]:
    """Columns of an Arrow schema as ``[{name, type, arrow_type}]``.

    ``type`` is an ibis dtype string (parse with ``ibis.dtype``), ``arrow_type`` the Arrow one.
    """
    columns = []
    for field in schema:
        try:
            ibis_type = str(dt.dtype(field.type))
        except Exception:  # an Arrow type ibis does not map; the client falls back to arrow_type
            ibis_type = "unknown"
        columns.append({"name": field.name, "type": ibis_type, "arrow_type": str(field.type)})
    return columns


def arrow_stream(table: pa.Table, summary: dict[str, Any]) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[SUMMARY_METADATA_KEY] = encode_summary(summary)
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def json_result(table: pa.Table, summary: dict[str, Any]) -> dict[str, Any]:
    rows = [[jsonable(v) for v in row.values()] for row in table.to_pylist()]
    return {"columns": schema_json(table.schema), "rows": rows, "summary": jsonable(summary)}


# ---------------------------------------------------------------------------
# The guard, one per worker thread


class GuardPool:
    """Runs calls of one shared ``Guard`` in worker threads, off the event loop.

    The guard is thread-safe (a DuckDB cursor per query, locks around its caches) and
    follows the store's ``CURRENT`` pointer itself: a new ingest becomes visible at the
    next query while queries already running keep the snapshot they started on.
    """

    def __init__(self, instance: Instance, guard_factory: Callable[[Instance], Any],
                 workers: int | None = None):
        self.instance = instance
        self._factory = guard_factory
        self._guard: Any = None
        self._guard_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2),
                                           thread_name_prefix="guard")

    def guard(self) -> Any:
        with self._guard_lock:
            if self._guard is None:
                self._guard = self._factory(self.instance)
            return self._guard

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            return getattr(self.guard(), method)(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
        close = getattr(self._guard, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------
# Authorization (authentication and the explicit scope check are sekisho.services.hubauth's)


def audit_denial(instance: Instance, user: str | None, role: str | None, endpoint: str,
                 code: str, why: str) -> None:
    """Record a refused request (bad token, missing scope, no role, role without views)."""
    instance.audit.append(
        "query.refused", user=user or "(unauthenticated)", role=role, outcome="denied",
        summary=f"guard service denied {endpoint}: {code}",
        details={"endpoint": endpoint, "code": code, "why": why, "via": "guard-service"})


# ---------------------------------------------------------------------------
# Handlers

INTERNAL_ERROR = ErrorEnvelope("internal_error", "the guard failed; see the service log / 関所の内部エラーです")


class ApiHandler(ServiceHandler):
    """Authenticated (hub token + explicit scope + a Sekisho role that may query), JSON errors."""

    api = True
    endpoint = "?"
    required_capability = "can_query"

    @property
    def service(self) -> "GuardService":
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
        self._audit_denial(None, None, "invalid_token", why)
        raise web.HTTPError(403, "invalid_token: the token is not valid")

    def on_denied(self, model: dict[str, Any], code: str, message: str, role: str | None) -> None:
        super().on_denied(model, code, message, role)
        self._audit_denial(model.get("name"), role, code, message)

    def _audit_denial(self, user: str | None, role: str | None, code: str, why: str) -> None:
        try:
            audit_denial(self.instance, user, role, self.endpoint, code, why)
        except Exception as e:  # the request is refused either way; say so in the service log
            log.error("cannot audit a denial (%s %s): %s", user, code, e)

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

    async def guarded(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the guard in the pool. A refusal, an audit failure or a bug is answered here
        (its status from ``sekisho.protocol``) and ``None`` returned."""
        try:
            return await self.service.pool.call(method, *args, **kwargs)
        except self.service.refusal_types as e:
            part = getattr(e, "part", None)
            self.send_error_envelope(ErrorEnvelope(str(getattr(e, "code", "refused")), str(getattr(e, "reason", e)),
                                                   None if part is None else str(part)))
        except AuditError:
            self.send_error_envelope(ErrorEnvelope(
                "audit_unavailable", "the audit log cannot be written; nothing was done "
                                     "/ 監査ログに書き込めないため処理しません"))
        except Exception:
            # a bug: the guard records what it audited itself; no answer seq exists yet
            log.exception("guard.%s for %s failed (%s; no audit seq is known)", method, self.hub_user, self.endpoint)
            self.send_error_envelope(INTERNAL_ERROR)
        return None

    async def encoded(self, what: str, audit_seq: Any, encode: Callable[..., Any], *args: Any) -> Any:
        """``encode(*args)`` in the pool; a failure (a bug: the answer was already audited)
        is logged with its traceback and the answer's audit seq, answered ``internal_error``
        and ``None`` returned."""
        try:
            return await self.service.pool.run(encode, *args)
        except Exception:
            log.exception("encoding %s for %s failed (audit seq %s)", what, self.hub_user, audit_seq)
            self.send_error_envelope(INTERNAL_ERROR)
            return None


class QueryHandler(ApiHandler):
    endpoint = QUERY_PATH

    async def post(self) -> None:
        try:
            request = QueryRequest.from_body(self.request.body)
        except RequestError as e:
            return self.send_error_envelope(e.envelope())
        kwargs: dict[str, Any] = {"user": self.hub_user}
        if request.mode is not None:  # omitted: the guard applies the role's default mode
            kwargs["mode"] = request.mode
        if request.epsilon is not None:
            kwargs["epsilon"] = request.epsilon
        result = await self.guarded("query", request.sql, **kwargs)
        if result is None:
            return
        seq = result.summary.get("query_id")
        if request.format == "json":
            body = await self.encoded("a JSON result", seq, json_result, result.table, result.summary)
            if body is not None:
                self.send_json(body)
            return
        body = await self.encoded("an Arrow result", seq, arrow_stream, result.table, result.summary)
        if body is None:
            return
        self.set_header("Content-Type", ARROW_STREAM)
        self.set_header(SUMMARY_HEADER, summary_header(result.summary))
        self.finish(body)


class DescribeHandler(ApiHandler):
    endpoint = DESCRIBE_PATH

    async def post(self) -> None:
        try:
            request = DescribeRequest.from_body(self.request.body)
        except RequestError as e:
            return self.send_error_envelope(e.envelope())
        schema = await self.guarded("describe", request.sql, user=self.hub_user)
        if schema is not None:
            self.send_json({"columns": schema_json(schema)})


class ViewsHandler(ApiHandler):
    endpoint = VIEWS_PATH

    async def get(self) -> None:
        views = await self.guarded("views", self.hub_user)
        if views is not None:
            self.send_json({"user": self.hub_user, "role": self.sekisho_role, "views": views})


class BudgetHandler(ApiHandler):
    endpoint = BUDGET_PATH

    async def get(self) -> None:
        budget = await self.guarded("budget", self.hub_user)
        if budget is not None:
            self.send_json({"user": self.hub_user, "role": self.sekisho_role, **budget})


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


# ---------------------------------------------------------------------------
# The service


class GuardService:
    """The instance, the guard pool and the tornado application."""

    def __init__(self, instance: Instance, *, hub_auth: Any = None, prefix: str = SERVICES[GUARD_SERVICE].path,
                 service_name: str = GUARD_SERVICE,
                 guard_factory: Callable[[Instance], Any] | None = None, workers: int | None = None,
                 refusal_types: tuple[type[BaseException], ...] = (QueryRefused,)):
        """``guard_factory``/``refusal_types`` default to the real guard; unit tests of the
        HTTP layer substitute a test double."""
        self.instance = instance
        self.refusal_types = refusal_types
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.service_name = service_name
        self.hub_auth = hub_auth
        self.pool = GuardPool(instance, guard_factory or Guard, workers)

    def make_app(self) -> web.Application:
        routes = [
            (re.escape(QUERY_PATH), QueryHandler),
            (re.escape(DESCRIBE_PATH), DescribeHandler),
            (re.escape(VIEWS_PATH), ViewsHandler),
            (re.escape(BUDGET_PATH), BudgetHandler),
            (re.escape(OPENAPI_PATH), OpenApiHandler),
        ]
        return make_app(self.service_name, routes, instance=self.instance, prefix=self.prefix,
                        hub_auth=self.hub_auth, guard_service=self,
                        default_handler_class=NotFoundHandler, compress_response=False)

    def listen(self, port: int, address: str = "127.0.0.1") -> HTTPServer:
        server = HTTPServer(self.make_app(), max_body_size=MAX_BODY_BYTES)
        server.listen(port, address)
        return server


def main() -> None:
    """Entry point of the managed service (``python -m sekisho.services.guard``)."""
    serve(GUARD_SERVICE, lambda instance, env, address, port: GuardService(
        instance, prefix=env["prefix"], service_name=env["name"]).listen(port, address))


if __name__ == "__main__":
    main()
