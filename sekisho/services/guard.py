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

Arrow responses carry the disclosure summary twice: in the Arrow schema metadata under
``sekisho.summary`` (UTF-8 JSON — the authoritative copy) and in the ``X-Sekisho-Summary``
header (ASCII JSON, for clients that do not parse Arrow metadata).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.instance import Instance
from sekisho.resources import resource_dir
from sekisho.services.hubauth import GUARD_SERVICE, ServiceHandler, make_app, serve

log = logging.getLogger("sekisho.services.guard")

ARROW_STREAM = "application/vnd.apache.arrow.stream"
SUMMARY_METADATA_KEY = b"sekisho.summary"
SUMMARY_HEADER = "X-Sekisho-Summary"
MAX_SQL_CHARS = 100_000
MAX_BODY_BYTES = 2_000_000  # a maximal sql (100k chars) even when every char is JSON-escaped
MODES = ("threshold", "dp")
FORMATS = ("arrow", "json")
QUERY_KEYS = {"sql", "mode", "epsilon", "format"}
DESCRIBE_KEYS = {"sql"}
# Hub tokens are URL-safe; anything else cannot be a token and is refused before the hub sees it.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{8,512}")
AUTH_HEADER_PATTERN = re.compile(r"(?:token|bearer)\s+(\S+)\s*", re.IGNORECASE)
OPENAPI_PATH = resource_dir("hub") / "guard-openapi.yaml"


# ---------------------------------------------------------------------------
# Errors as HTTP responses


class ApiError(Exception):
    """An error answered as ``status`` with body ``{code, reason, part}``."""

    def __init__(self, status: int, code: str, reason: str, part: str | None = None):
        super().__init__(reason)
        self.status, self.code, self.reason, self.part = status, code, reason, part

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "part": self.part}


def bad_request(reason: str, part: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", reason, part)


# ---------------------------------------------------------------------------
# Request validation (explicit, so every wrong input gets a message naming the key)


@dataclass(frozen=True)
class QueryRequest:
    sql: str
    mode: str | None
    epsilon: float | None
    format: str


def _parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("request body is empty; expected a JSON object / 本文が空です")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not UTF-8 (byte {e.start}) / 本文が UTF-8 ではありません") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno} / JSON として読めません") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__} "
                          "/ JSON オブジェクトを送ってください")
    return data


def _check_keys(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise bad_request(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                          f"{', '.join(sorted(allowed))} / 不明なキーがあります", unknown[0])


def _parse_sql(data: dict[str, Any]) -> str:
    sql = data.get("sql")
    if not isinstance(sql, str):
        got = "missing" if "sql" not in data else type(sql).__name__
        raise bad_request(f"key 'sql' must be a string (got {got}) / sql には文字列が必要です", "sql")
    if not sql.strip():
        raise bad_request("key 'sql' is empty / sql が空です", "sql")
    if len(sql) > MAX_SQL_CHARS:
        raise bad_request(f"key 'sql' is longer than {MAX_SQL_CHARS} characters / sql が長すぎます", "sql")
    if "\x00" in sql:
        raise bad_request("key 'sql' contains a NUL character / sql に NUL 文字があります", "sql")
    return sql


def parse_query_request(body: bytes) -> QueryRequest:
    data = _parse_json_object(body)
    _check_keys(data, QUERY_KEYS)
    sql = _parse_sql(data)
    mode = data.get("mode")
    if mode is not None and mode not in MODES:
        raise bad_request(f"key 'mode' must be one of {', '.join(MODES)} (got {mode!r}) "
                          "/ mode は threshold か dp です", "mode")
    epsilon = data.get("epsilon")
    if epsilon is not None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            raise bad_request(f"key 'epsilon' must be a number (got {type(epsilon).__name__}) "
                              "/ epsilon は数値です", "epsilon")
        epsilon = float(epsilon)
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise bad_request(f"key 'epsilon' must be a positive finite number (got {epsilon}) "
                              "/ epsilon は正の数です", "epsilon")
        if mode != "dp":
            raise bad_request("key 'epsilon' is only meaningful with mode 'dp' "
                              "/ epsilon は mode=dp のときだけ指定できます", "epsilon")
    fmt = data.get("format", "arrow")
    if fmt not in FORMATS:
        raise bad_request(f"key 'format' must be one of {', '.join(FORMATS)} (got {fmt!r}) "
                          "/ format は arrow か json です", "format")
    return QueryRequest(sql=sql, mode=mode, epsilon=epsilon, format=fmt)


def parse_describe_request(body: bytes) -> str:
    data = _parse_json_object(body)
    _check_keys(data, DESCRIBE_KEYS)
    return _parse_sql(data)


# ---------------------------------------------------------------------------
# Encoding results


def jsonable(value: Any) -> Any:
    """A JSON-safe form of one cell or summary value (NaN/inf become null)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


def schema_json(schema: pa.Schema) -> list[dict[str, str]]:
    """Columns of an Arrow schema as ``[{name, type, arrow_type}]``.

    ``type`` is an ibis dtype string (parse with ``ibis.dtype``), ``arrow_type`` the Arrow one.
    """
    import ibis.expr.datatypes as dt

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
    meta[SUMMARY_METADATA_KEY] = json.dumps(jsonable(summary), ensure_ascii=False).encode("utf-8")
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

    def __init__(self, instance: Instance, guard_factory: Callable[[Instance], Any] | None = None,
                 workers: int | None = None):
        self.instance = instance
        self._factory = guard_factory or _default_guard_factory
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


def _default_guard_factory(instance: Instance) -> Any:
    from sekisho.guard import Guard

    return Guard(instance)


def _guard_refusal_types() -> tuple[type[BaseException], ...]:
    from sekisho.guard import QueryRefused

    return (QueryRefused,)


# ---------------------------------------------------------------------------
# Authorization (authentication and the explicit scope check are sekisho.services.hubauth's)


def policy_role_views(instance: Instance, role: str) -> tuple[str, ...]:
    """Views the role may query, from the policy in force."""
    from sekisho.policy import load_policy

    path = instance.policy_path
    key = (path, path.stat().st_mtime_ns)
    policy = _policy_cache.get(key)
    if policy is None:
        policy = _policy_cache[key] = load_policy(path)
    spec = policy.roles.get(role)
    return tuple(spec.views) if spec is not None else ()


_policy_cache: dict[tuple[Path, int], Any] = {}


def audit_denial(instance: Instance, user: str | None, role: str | None, endpoint: str,
                 code: str, why: str) -> None:
    """Record a refused request (bad token, missing scope, no role, role without views)."""
    instance.audit.append(
        "query.refused", user=user or "(unauthenticated)", role=role, outcome="denied",
        summary=f"guard service denied {endpoint}: {code}",
        details={"endpoint": endpoint, "code": code, "why": why, "via": "guard-service"})


# ---------------------------------------------------------------------------
# Handlers


class ApiHandler(ServiceHandler):
    """Authenticated (hub token + explicit scope + Sekisho role with views), JSON errors."""

    api = True
    endpoint = "?"

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
        if self._finished:
            return
        if not policy_role_views(self.instance, self.sekisho_role):
            self._deny(self.hub_user_model, "role_not_allowed",
                       f"role {self.sekisho_role!r} has no views", role=self.sekisho_role)

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
        code, reason = self.ERRORS.get(status_code, ("internal_error", "internal error / 内部エラー"))
        denied = getattr(self, "denied_code", None)
        if status_code == 403 and denied:
            detail = exc.log_message.split(": ", 1)[-1] if isinstance(exc, web.HTTPError) and exc.log_message else denied
            code, reason = denied, f"{detail} / {self.DENIAL_TEXT_JA.get(denied, '権限がありません')}"
        elif isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
            reason = f"{exc.log_message} / {reason.split(' / ')[-1]}"
        self.send_api_error(ApiError(status_code, code, reason))

    def send_api_error(self, e: ApiError) -> None:
        self.clear_header("X-Sekisho-Summary")
        self.set_status(e.status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(e.body(), ensure_ascii=False))

    def send_json(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(jsonable(data), ensure_ascii=False))

    async def guarded(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the guard in the pool; a refusal is answered 422 and ``None`` returned."""
        from sekisho.audit import AuditError

        refused = self.service.refusal_types
        try:
            return await self.service.pool.call(method, *args, **kwargs)
        except refused as e:
            self.send_api_error(ApiError(422, str(getattr(e, "code", "refused")),
                                         str(getattr(e, "reason", e)),
                                         _part(getattr(e, "part", None))))
        except AuditError:
            self.send_api_error(ApiError(503, "audit_unavailable",
                                         "the audit log cannot be written; nothing was done "
                                         "/ 監査ログに書き込めないため処理しません"))
        except Exception:
            log.exception("guard call %s failed", method)
            self.send_api_error(ApiError(500, "internal_error",
                                         "the guard failed; see the service log / 関所の内部エラーです"))
        return None


def _part(part: Any) -> str | None:
    return None if part is None else str(part)


class QueryHandler(ApiHandler):
    endpoint = "api/query"

    async def post(self) -> None:
        try:
            req = parse_query_request(self.request.body)
        except ApiError as e:
            return self.send_api_error(e)
        kwargs: dict[str, Any] = {"user": self.hub_user}
        if req.mode is not None:  # omitted: the guard applies the role's default mode
            kwargs["mode"] = req.mode
        if req.epsilon is not None:
            kwargs["epsilon"] = req.epsilon
        result = await self.guarded("query", req.sql, **kwargs)
        if result is None:
            return
        if req.format == "json":
            return self.send_json(json_result(result.table, result.summary))
        body = await self.service.pool.run(arrow_stream, result.table, result.summary)
        self.set_header("Content-Type", ARROW_STREAM)
        self.set_header(SUMMARY_HEADER, json.dumps(jsonable(result.summary), ensure_ascii=True))
        self.finish(body)


class DescribeHandler(ApiHandler):
    endpoint = "api/describe"

    async def post(self) -> None:
        try:
            sql = parse_describe_request(self.request.body)
        except ApiError as e:
            return self.send_api_error(e)
        schema = await self.guarded("describe", sql, user=self.hub_user)
        if schema is not None:
            self.send_json({"columns": schema_json(schema)})


class ViewsHandler(ApiHandler):
    endpoint = "api/views"

    async def get(self) -> None:
        views = await self.guarded("views", self.hub_user)
        if views is not None:
            self.send_json({"user": self.hub_user, "role": self.sekisho_role, "views": views})


class BudgetHandler(ApiHandler):
    endpoint = "api/budget"

    async def get(self) -> None:
        budget = await self.guarded("budget", self.hub_user)
        if budget is not None:
            self.send_json({"user": self.hub_user, "role": self.sekisho_role, **budget})


class OpenApiHandler(web.RequestHandler):
    """The API description itself (public: it holds no data)."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=utf-8")
        self.finish(OPENAPI_PATH.read_bytes())


class NotFoundHandler(web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(404)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"code": "not_found", "reason": "no such endpoint "
                                "/ そのような API はありません", "part": None}))


# ---------------------------------------------------------------------------
# The service


class GuardService:
    """The instance, the guard pool and the tornado application."""

    def __init__(self, instance: Instance, *, hub_auth: Any = None, prefix: str = "/services/guard/",
                 service_name: str = GUARD_SERVICE,
                 guard_factory: Callable[[Instance], Any] | None = None, workers: int | None = None,
                 refusal_types: tuple[type[BaseException], ...] | None = None):
        """``guard_factory``/``refusal_types`` default to the real guard; unit tests of the
        HTTP layer substitute a test double."""
        self.instance = instance
        self.refusal_types = refusal_types or _guard_refusal_types()
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.service_name = service_name
        self.hub_auth = hub_auth
        self.pool = GuardPool(instance, guard_factory, workers)

    def make_app(self) -> web.Application:
        routes = [
            (r"api/query", QueryHandler),
            (r"api/describe", DescribeHandler),
            (r"api/views", ViewsHandler),
            (r"api/budget", BudgetHandler),
            (r"api/openapi\.yaml", OpenApiHandler),
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
