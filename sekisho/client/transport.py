"""How the ibis backend reaches the guard: over HTTP (analysts) or in-process (reports)."""

from __future__ import annotations

import json
import os
from typing import Any

import ibis.common.exceptions as exc
import ibis.expr.schema as sch
import pyarrow as pa

ARROW_STREAM = "application/vnd.apache.arrow.stream"
SUMMARY_METADATA_KEY = b"sekisho.summary"


class GuardError(exc.IbisError):
    """The guard could not be reached or did not accept the request (not a refusal)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class QueryRefused(exc.IbisError):
    """The guard refused the query. ``code`` is stable, ``reason`` bilingual, ``part`` the SQL at fault."""

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
    return base + "/services/guard/"


def _schema_from_columns(columns: list[dict[str, Any]]) -> sch.Schema:
    import ibis

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
    raw = meta.pop(SUMMARY_METADATA_KEY, None)
    summary = json.loads(raw.decode("utf-8")) if raw else {}
    return table.replace_schema_metadata(meta or None), summary


class HttpTransport:
    """The guard service, authenticated with the caller's hub token."""

    def __init__(self, url: str, token: str, *, timeout: float = 120.0):
        import requests

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
        import requests

        try:
            response = self.session.request(method, self.url + path, json=payload, timeout=self.timeout)
        except requests.RequestException as e:
            raise GuardError(f"cannot reach the guard at {self.url}: {e} "
                             "/ 関所サービスに接続できません") from None
        if response.status_code == 200:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("code") if isinstance(body, dict) else None
        reason = body.get("reason") if isinstance(body, dict) else None
        if response.status_code == 422:
            raise QueryRefused(code or "refused", reason or "refused by the guard / 照会は拒否されました",
                               body.get("part"))
        raise GuardError(f"guard answered {response.status_code} {code or ''}: "
                         f"{reason or response.text[:300]}", status=response.status_code, code=code)

    def views(self) -> dict[str, Any]:
        return self._request("GET", "api/views").json()

    def budget(self) -> dict[str, Any]:
        return self._request("GET", "api/budget").json()

    def describe(self, sql: str) -> sch.Schema:
        return _schema_from_columns(self._request("POST", "api/describe", {"sql": sql}).json()["columns"])

    def query(self, sql: str, *, mode: str | None, epsilon: float | None) -> tuple[pa.Table, dict[str, Any]]:
        payload: dict[str, Any] = {"sql": sql, "format": "arrow"}
        if mode is not None:
            payload["mode"] = mode
        if epsilon is not None:
            payload["epsilon"] = epsilon
        response = self._request("POST", "api/query", payload)
        if not response.headers.get("Content-Type", "").startswith(ARROW_STREAM):
            raise GuardError(f"the guard answered {response.headers.get('Content-Type')!r}, not Arrow")
        with pa.ipc.open_stream(response.content) as reader:
            table = reader.read_all()
        return split_summary(table)


class InProcessTransport:
    """``sekisho.guard.Guard`` in this process (reports; needs read access to the instance)."""

    def __init__(self, home: str | os.PathLike | None, user: str):
        from sekisho.guard import Guard
        from sekisho.instance import Instance

        self.instance = Instance.open(home)
        self.user = user
        self.guard = Guard(self.instance)

    def describe_target(self) -> str:
        return f"in-process guard of {self.instance.home}"

    def close(self) -> None:
        close = getattr(self.guard, "close", None)
        if callable(close):
            close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from sekisho.guard import QueryRefused as GuardRefused

        try:
            return getattr(self.guard, method)(*args, **kwargs)
        except GuardRefused as e:
            raise QueryRefused(e.code, e.reason, e.part) from None

    def views(self) -> dict[str, Any]:
        from sekisho.state import role_of

        return {"user": self.user, "role": role_of(self.instance, self.user),
                "views": self._call("views", self.user)}

    def budget(self) -> dict[str, Any]:
        return {"user": self.user, **self._call("budget", self.user)}

    def describe(self, sql: str) -> sch.Schema:
        return sch.Schema.from_pyarrow(self._call("describe", sql, user=self.user))

    def query(self, sql: str, *, mode: str | None, epsilon: float | None) -> tuple[pa.Table, dict[str, Any]]:
        kwargs: dict[str, Any] = {"user": self.user}
        if mode is not None:
            kwargs["mode"] = mode
        if epsilon is not None:
            kwargs["epsilon"] = epsilon
        result = self._call("query", sql, **kwargs)
        return result.table, dict(result.summary)
