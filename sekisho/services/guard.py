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

The service's modules: this one (the endpoints, ``GuardService``, ``main``),
``guard_handlers`` (authentication, audited denials, errors, calling the guard),
``guard_pool`` (the worker threads, in fair order) and ``guard_wire`` (encoding answers).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.access import GUARD_SERVICE, SERVICES
from sekisho.audit import DenialLog
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.limits import Cancel
from sekisho.instance import Instance
from sekisho.protocol import (ARROW_STREAM, BUDGET_PATH, DESCRIBE_PATH, JSON_CONTENT, MAX_BODY_BYTES,
                              OPENAPI_PATH, QUERY_PATH, SUMMARY_HEADER, VIEWS_PATH, DescribeRequest,
                              QueryRequest, RequestError, attach_cells, cells_json, summary_header)
from sekisho.services.guard_handlers import (AUTH_HEADER_PATTERN, BUSY, INTERNAL_ERROR, OPENAPI_FILE,  # noqa: F401
                                             TOKEN_PATTERN, ApiHandler, NotFoundHandler, OpenApiHandler,
                                             audit_denial)
from sekisho.services.guard_pool import GuardPool, PoolBusy, default_per_user, default_workers  # noqa: F401
from sekisho.services.guard_wire import (Encoded, EncodingFailed, arrow_stream, json_result,  # noqa: F401
                                         schema_json)
from sekisho.services.hubauth import make_app, serve


def answer(guard: Any, request: QueryRequest, user: str, cancel: Cancel | None = None) -> Encoded:
    """Ask the guard and encode its answer, in one worker-thread call (one hop off the
    event loop per query, and the event loop never touches the table). ``cancel``: set
    when the client has gone (the query ends as ``cancelled``)."""
    kwargs: dict[str, Any] = {"user": user}
    if cancel is not None:
        kwargs["cancel"] = cancel
    if request.mode is not None:  # omitted: the guard applies the role's default mode
        kwargs["mode"] = request.mode
    if request.epsilon is not None:
        kwargs["epsilon"] = request.epsilon
    result = guard.query(request.sql, **kwargs)
    cells = getattr(result, "cells", None)   # per-cell status and accuracy (sekisho.protocol)
    try:
        if request.format == "json":
            payload = json_result(result.table, result.summary)
            if cells is not None:
                payload["cells"] = cells_json(cells)
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            return Encoded(body, JSON_CONTENT)
        return Encoded(arrow_stream(attach_cells(result.table, cells), result.summary), ARROW_STREAM,
                       summary_header(result.summary))
    except Exception as e:
        raise EncodingFailed(result.summary.get("query_id")) from e


answer.guard_method = "query"   # named so in the service log when it fails


def describe(guard: Any, sql: str, user: str, role: str | None, instance: Instance,
             refusal_types: tuple[type[BaseException], ...]) -> Any:
    """The result schema of ``sql`` (no data read, no budget spent), in one worker-thread
    call. The guard's ``describe`` does not audit; a refusal here is the analyst's first
    and often only contact with the rule (``con.sql(...)`` describes before it runs), so
    it is put on record as ``query.refused`` (``details.stage: "describe"``) before the
    refusal is answered — and if it cannot be, the ``AuditError`` is answered instead."""
    try:
        return guard.describe(sql, user=user)
    except refusal_types as refusal:
        code = str(getattr(refusal, "code", "refused"))
        part = getattr(refusal, "part", None)
        instance.audit.append(
            "query.refused", user=user, role=role, outcome="refused", summary=f"refused at describe: {code}",
            details={"sql": sql, "decision": "refused", "code": code,
                     "reason": str(getattr(refusal, "reason", refusal)),
                     "part": None if part is None else str(part), "stage": "describe",
                     "endpoint": DESCRIBE_PATH, "epsilon_spent": 0.0, "via": "guard-service"})
        raise


describe.guard_method = "describe"


# ---------------------------------------------------------------------------
# Endpoints


class QueryHandler(ApiHandler):
    endpoint = QUERY_PATH
    sql: str | None = None
    cancel: Cancel | None = None

    def on_connection_close(self) -> None:
        """The client went away (gave up, or its kernel was stopped): stop its query, so
        that nobody's thread and core stay busy with an answer nobody waits for."""
        if self.cancel is not None:
            self.cancel.cancel()
        super().on_connection_close()

    async def post(self) -> None:
        try:
            request = QueryRequest.from_body(self.request.body)
        except RequestError as e:
            return self.send_error_envelope(e.envelope())
        self.sql = request.sql
        self.cancel = Cancel()
        encoded = await self.guarded(answer, request, self.hub_user, self.cancel)
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
        schema = await self.guarded(describe, request.sql, self.hub_user, self.sekisho_role, self.instance,
                                    self.service.refusal_types)
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
        self.denials = DenialLog(instance.audit, service_name)   # 401/403 on record, per source and minute

    def make_app(self) -> web.Application:
        routes = [
            (re.escape(QUERY_PATH), QueryHandler),
            (re.escape(DESCRIBE_PATH), DescribeHandler),
            (re.escape(VIEWS_PATH), ViewsHandler),
            (re.escape(BUDGET_PATH), BudgetHandler),
            (re.escape(OPENAPI_PATH), OpenApiHandler),
        ]
        return make_app(self.service_name, routes, instance=self.instance, prefix=self.prefix,
                        hub_auth=self.hub_auth, denials=self.denials, guard_service=self,
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
