"""How the ibis backend reaches the guard: over HTTP (analysts) or in-process (reports).

Both transports give the backend the same things — views, budget, a result schema, a
protected table with its disclosure summary — and the same two failures: a
:class:`GuardRefusal` (the guard said no; ``code``, ``reason``, ``part``; also when it
stopped a query at its time or memory limit, ``resource_limit``, or was too busy to start
it, ``guard_busy``) or a :class:`GuardError` (the guard could not be asked; its subclass
:class:`GuardTimeout` when it did not answer within the client's timeout). The wire format is
``sekisho.protocol``, shared with the guard service.
"""

from __future__ import annotations

import os
from typing import Any

import ibis
import ibis.common.exceptions as exc
import ibis.expr.schema as sch
import pyarrow as pa
import requests

from sekisho.access import GUARD_SERVICE, service_path
from sekisho.errors import SekishoError
from sekisho.instance import Instance
from sekisho.protocol import (ARROW_STREAM, BUDGET_PATH, DESCRIBE_PATH, QUERY_PATH, SUMMARY_METADATA_KEY,
                              VIEWS_PATH, DescribeRequest, ErrorEnvelope, QueryRequest, decode_summary, is_refusal,
                              split_cells)
from sekisho.state import role_of


class GuardError(SekishoError, exc.IbisError):
    """The guard could not be reached or did not accept the request (not a refusal)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class GuardTimeout(GuardError):
    """The guard did not answer within the client's timeout (``timeout`` seconds).

    Not a refusal and not an unreachable guard: the request arrived and the guard may still
    be working on it (a query runs on within the guard's own time limit, and is audited)."""

    def __init__(self, message: str, *, timeout: float):
        super().__init__(message, code="client_timeout")
        self.timeout = timeout


class GuardRefusal(SekishoError, exc.IbisError):
    """The guard refused the query. ``code`` is stable, ``reason`` bilingual, ``part`` the SQL at fault.

    The client-side form of the guard's ``sekisho.guard.QueryRefused`` (which the client
    never imports: kernels do not load the guard), and an ibis error like the others an
    ibis user handles.
    """

    def __init__(self, code: str, reason: str, part: str | None = None):
        super().__init__(f"[{code}] {reason}" + (f" — {part}" if part else ""))
        self.code, self.reason, self.part = code, reason, part


def guard_url_from_env() -> str:
    """``$SEKISHO_GUARD_URL``, else the hub's ``/services/guard/`` next to ``$JUPYTERHUB_API_URL``."""
    url = os.environ.get("SEKISHO_GUARD_URL")
    if url:
        return url if url.endswith("/") else url + "/"
    api = os.environ.get("JUPYTERHUB_API_URL")
    if not api:
        raise GuardError("cannot find the guard: set SEKISHO_GUARD_URL (or run inside JupyterHub) "
                         "/ 関所サービスの URL が分かりません")
    base = api.rstrip("/")
    for suffix in ("/hub/api", "/api"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base + service_path(GUARD_SERVICE)


def _schema_from_columns(columns: list[dict[str, Any]]) -> sch.Schema:
    fields = {}
    for col in columns:
        try:
            fields[col["name"]] = ibis.dtype(col["type"])
        except Exception as e:
            raise GuardError(f"the guard described column {col.get('name')!r} with an unknown type "
                             f"{col.get('type')!r}") from e
    return sch.Schema(fields)


def split_summary(table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Take the disclosure summary out of an Arrow result's schema metadata."""
    meta = dict(table.schema.metadata or {})
    summary = decode_summary(meta.pop(SUMMARY_METADATA_KEY, None))
    return table.replace_schema_metadata(meta or None), summary


class HttpTransport:
    """The guard service, authenticated with the caller's hub token."""

    def __init__(self, url: str, token: str, *, timeout: float = 120.0):
        self.url = url if url.endswith("/") else url + "/"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {token}"
        self.session.trust_env = False  # the guard is on the hub's network; never via a proxy

    def describe_target(self) -> str:
        return self.url

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            response = self.session.request(method, self.url + path, json=payload, timeout=self.timeout)
        except requests.ReadTimeout:
            # connected and sent: the guard is working on it, it did not answer in time
            raise self._timed_out(path) from None
        except requests.RequestException as e:
            raise GuardError(f"cannot reach the guard at {self.url}: {e} "
                             "/ 関所サービスに接続できません") from None
        if response.status_code == 200:
            return response
        try:
            body = response.json()
        except ValueError:
            body = None
        error = ErrorEnvelope.from_json(body, response.status_code)
        if is_refusal(response.status_code, error.code):
            raise GuardRefusal(error.code, error.reason, error.part)
        detail = error.reason if isinstance(body, dict) and "reason" in body else response.text[:300]
        raise GuardError(f"guard answered {response.status_code} {error.code}: {detail}",
                         status=response.status_code, code=error.code)

    def _timed_out(self, path: str) -> GuardTimeout:
        n = f"{self.timeout:g}"
        if path == QUERY_PATH:
            return GuardTimeout(
                f"照会に {n} 秒以上かかったため、結果を待つのをやめました（関所はその照会を上限時間まで"
                f"処理し、記録します）。条件や区分を減らすか、ibis.sekisho.connect(timeout=...) で待ち時間を"
                f"延ばしてください / the query took longer than {n} s, so the client stopped waiting (the "
                f"guard goes on with it up to its own time limit, and audits it). Narrow the query, or "
                f"wait longer with ibis.sekisho.connect(timeout=...)", timeout=self.timeout)
        return GuardTimeout(f"関所サービスが {n} 秒以内に応答しませんでした / the guard did not answer "
                            f"within {n} s ({path})", timeout=self.timeout)

    def views(self) -> dict[str, Any]:
        return self._request("GET", VIEWS_PATH).json()

    def budget(self) -> dict[str, Any]:
        return self._request("GET", BUDGET_PATH).json()

    def describe(self, sql: str) -> sch.Schema:
        response = self._request("POST", DESCRIBE_PATH, DescribeRequest(sql).to_json())
        return _schema_from_columns(response.json()["columns"])

    def query(self, sql: str, *, mode: str | None, epsilon: float | None) -> tuple[pa.Table, dict[str, Any]]:
        table, summary, _ = self.query_with_cells(sql, mode=mode, epsilon=epsilon)
        return table, summary

    def query_with_cells(self, sql: str, *, mode: str | None,
                         epsilon: float | None) -> tuple[pa.Table, dict[str, Any], pa.Table | None]:
        """(answer, summary, cells table or None): the per-cell status and accuracy
        travel in the answer's schema metadata (``sekisho.protocol.split_cells``)."""
        request = QueryRequest(sql=sql, mode=mode, epsilon=epsilon, format="arrow")
        response = self._request("POST", QUERY_PATH, request.to_json())
        if not response.headers.get("Content-Type", "").startswith(ARROW_STREAM):
            raise GuardError(f"the guard answered {response.headers.get('Content-Type')!r}, not Arrow")
        with pa.ipc.open_stream(response.content) as reader:
            table = reader.read_all()
        try:
            table, cells = split_cells(table)
        except ValueError as e:
            raise GuardError(str(e)) from None
        table, summary = split_summary(table)
        return table, summary, cells


class InProcessTransport:
    """``sekisho.guard.Guard`` in this process (reports; needs read access to the instance).

    The guard is imported here, not at the top: analysts' kernels use the HTTP transport
    only and never load the guard and its store engine.
    """

    def __init__(self, home: str | os.PathLike | None, user: str):
        from sekisho.guard import Guard, QueryRefused

        self.instance = Instance.open(home)
        self.user = user
        self.guard = Guard(self.instance)
        self._refused = QueryRefused

    def describe_target(self) -> str:
        return f"in-process guard of {self.instance.home}"

    def close(self) -> None:
        self.guard.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.guard, method)(*args, **kwargs)
        except self._refused as e:
            raise GuardRefusal(e.code, e.reason, e.part) from None

    def views(self) -> dict[str, Any]:
        return {"user": self.user, "role": role_of(self.instance, self.user),
                "views": self._call("views", self.user)}

    def budget(self) -> dict[str, Any]:
        return {"user": self.user, **self._call("budget", self.user)}

    def describe(self, sql: str) -> sch.Schema:
        return sch.Schema.from_pyarrow(self._call("describe", sql, user=self.user))

    def query(self, sql: str, *, mode: str | None, epsilon: float | None) -> tuple[pa.Table, dict[str, Any]]:
        table, summary, _ = self.query_with_cells(sql, mode=mode, epsilon=epsilon)
        return table, summary

    def query_with_cells(self, sql: str, *, mode: str | None,
                         epsilon: float | None) -> tuple[pa.Table, dict[str, Any], pa.Table | None]:
        kwargs: dict[str, Any] = {"user": self.user}
        if mode is not None:
            kwargs["mode"] = mode
        if epsilon is not None:
            kwargs["epsilon"] = epsilon
        result = self._call("query", sql, **kwargs)
        return result.table, dict(result.summary), getattr(result, "cells", None)
