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
guard itself. Guard calls run on a few worker threads over one shared ``Guard``
(``GuardPool``: the guard's ``max_running`` + 2 threads, DuckDB releasing the GIL while it
executes; waiting calls queue in the event loop and are dispatched in fair order between
users, as the guard admits queries). A query is asked and its answer encoded in one
worker-thread call, the Arrow IPC stream written straight from the guard's table. The
guard follows the store's ``CURRENT`` pointer: a new ingest becomes visible at the next
query while in-flight queries keep the snapshot they started on.

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
import itertools
import json
import logging
import os
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import ibis.expr.datatypes as dt
import pyarrow as pa
from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.access import GUARD_SERVICE, SERVICES
from sekisho.audit import AuditError
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.limits import Limits
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
    """The protected table as one Arrow IPC stream, the summary in its schema metadata.

    Written straight from the guard's table (its record batches as they are: metadata is
    replaced without copying the columns), so the only copies are the stream itself and
    the bytes handed to the HTTP server."""
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


class EncodingFailed(Exception):
    """Encoding an answer failed (a bug: the answer was already audited, as ``seq``)."""

    def __init__(self, seq: Any):
        super().__init__(f"encoding the answer of audit seq {seq} failed")
        self.seq = seq


@dataclass(frozen=True)
class Encoded:
    """An answer ready for the wire: body, content type, and the summary header (Arrow only)."""

    body: bytes
    content_type: str
    summary_header: str | None = None


def answer(guard: Any, request: QueryRequest, user: str) -> Encoded:
    """Ask the guard and encode its answer, in one worker-thread call (one hop off the
    event loop per query, and the event loop never touches the table)."""
    kwargs: dict[str, Any] = {"user": user}
    if request.mode is not None:  # omitted: the guard applies the role's default mode
        kwargs["mode"] = request.mode
    if request.epsilon is not None:
        kwargs["epsilon"] = request.epsilon
    result = guard.query(request.sql, **kwargs)
    try:
        if request.format == "json":
            body = json.dumps(json_result(result.table, result.summary), ensure_ascii=False).encode("utf-8")
            return Encoded(body, JSON_CONTENT)
        return Encoded(arrow_stream(result.table, result.summary), ARROW_STREAM, summary_header(result.summary))
    except Exception as e:
        raise EncodingFailed(result.summary.get("query_id")) from e


# ---------------------------------------------------------------------------
# The guard on a few worker threads, in fair order


class PoolBusy(Exception):
    """A call waited longer than the guard's query time for a worker thread."""

    def __init__(self, waited: float):
        super().__init__(f"no worker thread within {waited:.0f} s")
        self.waited = waited


@dataclass(eq=False)
class _Waiter:
    arrival: int
    user: str
    since: float
    ready: asyncio.Future


def default_workers(limits: Limits) -> int:
    """Worker threads for the guard's calls: the queries it executes at once
    (``max_running``) plus two, so that a query's Python work (planning, protection:
    under the GIL) overlaps the others' DuckDB work (which releases it)."""
    return limits.max_running + 2


def default_per_user(limits: Limits) -> int:
    """Calls of one user in progress at once: the queries the guard executes for one user
    (``max_running_per_user``) plus one being planned. More would only wait in the guard's
    admission while holding a thread another user could use."""
    return limits.max_running_per_user + 1


class GuardPool:
    """Runs calls of one shared ``Guard`` on a few worker threads, off the event loop,
    in fair order.

    The guard is thread-safe (a DuckDB cursor per query, locks around its caches) and
    follows the store's ``CURRENT`` pointer itself: a new ingest becomes visible at the
    next query while queries already running keep the snapshot they started on.

    **Threads.** DuckDB releases the GIL while it executes; the guard's own Python work
    per query holds it. The guard executes at most ``max_running`` queries at once (its
    admission), so threads beyond ``max_running`` + 2 (``default_workers``) would only
    add contention on the GIL and the cores, and per-thread state (each thread keeps a
    DuckDB cursor with prepared statements and a post-processing database).

    **Order.** A call that finds every thread busy waits here, in the event loop (no
    thread held), and is dispatched as the guard admits queries: first the user with
    fewest calls in progress, then the user dispatched least recently, then arrival. A
    first-in first-out pool would let one analyst's burst queue ahead of everybody else
    (the guard's fair share only sees calls that have a thread). A user has at most
    ``per_user`` calls in progress (``default_per_user``), so a burst leaves threads free
    for others even when nobody else is waiting yet. A call still waiting after
    ``wait_seconds`` (default: the guard's ``query_seconds``) fails with ``PoolBusy``,
    answered ``guard_busy`` like the guard's own admission.
    """

    def __init__(self, instance: Instance, guard_factory: Callable[[Instance], Any],
                 workers: int | None = None, wait_seconds: float | None = None, per_user: int | None = None):
        self.instance = instance
        self._factory = guard_factory
        self._guard: Any = None
        self._guard_lock = threading.Lock()
        limits = Limits.from_config(instance.config)
        self.workers = workers or default_workers(limits)
        self.wait_seconds = wait_seconds or limits.query_seconds
        self.per_user = per_user or default_per_user(limits)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="guard")
        # the dispatcher's state, touched only on the event loop thread
        self._busy = 0
        self._running: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._ticks = itertools.count(1)
        self._arrivals = itertools.count()
        self._waiting: list[_Waiter] = []
        self.dispatched: deque[str] = deque(maxlen=1000)   # dispatch order, for tests and tools

    def guard(self) -> Any:
        with self._guard_lock:
            if self._guard is None:
                self._guard = self._factory(self.instance)
            return self._guard

    async def call(self, caller: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``guard.<method>(*args, **kwargs)`` on a worker thread, dispatched for ``caller``."""
        def run() -> Any:
            return getattr(self.guard(), method)(*args, **kwargs)

        return await self.run(caller, run)

    async def run(self, user: str, fn: Callable[..., Any], /, *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, dispatched for ``user`` (see the class)."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(next(self._arrivals), user, loop.time(), loop.create_future())
        self._waiting.append(waiter)
        self._dispatch()
        if not waiter.ready.done():
            timer = loop.call_later(self.wait_seconds, self._expire, waiter)
            try:
                await waiter.ready
            except asyncio.CancelledError:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                raise
            finally:
                timer.cancel()
        # the slot is released when the thread is done, even if this coroutine is not awaited to the end
        future = self.executor.submit(fn, *args)
        future.add_done_callback(lambda _: self._release_threadsafe(loop, user))
        return await asyncio.wrap_future(future)

    def _dispatch(self) -> None:
        while self._busy < self.workers:
            eligible = [w for w in self._waiting if self._running.get(w.user, 0) < self.per_user]
            if not eligible:
                return
            waiter = min(eligible, key=lambda w: (self._running.get(w.user, 0), self._last.get(w.user, 0), w.arrival))
            self._waiting.remove(waiter)
            if waiter.ready.done():   # cancelled meanwhile
                continue
            self._busy += 1
            self._running[waiter.user] = self._running.get(waiter.user, 0) + 1
            self._last[waiter.user] = next(self._ticks)
            self.dispatched.append(waiter.user)
            waiter.ready.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter in self._waiting and not waiter.ready.done():
            self._waiting.remove(waiter)
            waiter.ready.set_exception(PoolBusy(asyncio.get_running_loop().time() - waiter.since))

    def _release_threadsafe(self, loop: asyncio.AbstractEventLoop, user: str) -> None:
        try:
            loop.call_soon_threadsafe(self._release, user)
        except RuntimeError:   # the loop is closed: the service is shutting down
            pass

    def _release(self, user: str) -> None:
        self._busy -= 1
        self._running[user] -= 1
        if not self._running[user]:
            del self._running[user]
        self._dispatch()

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
BUSY = ErrorEnvelope("guard_busy", "混み合っているため実行できませんでした。しばらくしてから再度実行してください "
                                   "/ the guard is busy with other queries; try again shortly")


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
            name = method if isinstance(method, str) else "query" if method is answer else method.__name__
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


class QueryHandler(ApiHandler):
    endpoint = QUERY_PATH
    sql: str | None = None

    async def post(self) -> None:
        try:
            request = QueryRequest.from_body(self.request.body)
        except RequestError as e:
            return self.send_error_envelope(e.envelope())
        self.sql = request.sql
        encoded = await self.guarded(answer, request, self.hub_user)
        if encoded is None:
            return
        self.set_header("Content-Type", encoded.content_type)
        if encoded.summary_header is not None:
            self.set_header(SUMMARY_HEADER, encoded.summary_header)
        self.finish(encoded.body)


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
                 wait_seconds: float | None = None,
                 refusal_types: tuple[type[BaseException], ...] = (QueryRefused,)):
        """``guard_factory``/``refusal_types`` default to the real guard; unit tests of the
        HTTP layer substitute a test double. ``workers`` and ``wait_seconds``: see
        ``GuardPool`` (defaults from the guard's limits in ``config.yaml``)."""
        self.instance = instance
        self.refusal_types = refusal_types
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.service_name = service_name
        self.hub_auth = hub_auth
        self.pool = GuardPool(instance, guard_factory or Guard, workers, wait_seconds)

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
    """Entry point of the managed service (``python -m sekisho.services.guard``).

    ``$SEKISHO_GUARD_WORKERS`` overrides the number of worker threads (``GuardPool``;
    default: the guard's ``max_running`` + 2), for measurements."""
    workers = int(os.environ.get("SEKISHO_GUARD_WORKERS") or 0) or None
    serve(GUARD_SERVICE, lambda instance, env, address, port: GuardService(
        instance, prefix=env["prefix"], service_name=env["name"], workers=workers).listen(port, address))


if __name__ == "__main__":
    main()
