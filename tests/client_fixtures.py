"""Fixtures for the guard service and the ibis client.

* ``HubApiDouble``: a stand-in for the hub's REST endpoint ``GET /hub/api/user`` (token ->
  user model with scopes). The service under test talks to it through the real
  ``jupyterhub.services.auth.HubOAuth`` code, so token handling and the explicit scope
  check are exercised; the end-to-end tests (``@pytest.mark.hub``) use a real hub.
* ``GuardDouble``: a test double of ``sekisho.guard.Guard`` for the HTTP-layer unit tests
  only (answers fixed small tables, refuses ``SELECT *``). Tests that show protection use
  the real guard.
* ``ServiceThread``: runs a ``GuardService`` on a loopback port in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest
from tornado import web
from tornado.httpserver import HTTPServer

GUARD_SCOPE = "access:services!service=guard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LoopThread:
    """A thread running an asyncio loop with one tornado HTTP server."""

    def __init__(self, make_app, port: int | None = None, **server_kwargs: Any):
        self.port = port or free_port()
        self._make_app = make_app
        self._server_kwargs = server_kwargs
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = HTTPServer(self._make_app(), **self._server_kwargs)
        self.server.listen(self.port, "127.0.0.1")
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "_LoopThread":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        def shutdown() -> None:
            self.server.stop()
            self.loop.stop()

        self.loop.call_soon_threadsafe(shutdown)
        self._thread.join(10)


class HubApiDouble(_LoopThread):
    """``GET /hub/api/user``: the user model for a known token, 403 otherwise."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.calls = 0
        outer = self

        class UserHandler(web.RequestHandler):
            def get(self) -> None:
                outer.calls += 1
                auth = self.request.headers.get("Authorization", "")
                token = auth.split(None, 1)[1] if " " in auth else ""
                model = outer.tokens.get(token)
                if model is None:
                    self.set_status(403)
                    self.finish({"status": 403, "message": "invalid token"})
                    return
                self.finish(model)

        super().__init__(lambda: web.Application([(r"/hub/api/user", UserHandler)]))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hub/api"

    def add_token(self, token: str, name: str, scopes: list[str], kind: str = "user") -> str:
        self.tokens[token] = {"kind": kind, "name": name, "scopes": scopes, "admin": False,
                              "groups": [], "roles": ["user"]}
        return token


@pytest.fixture(scope="module")
def hub_api():
    """A stand-in hub answering /hub/api/user for the tokens a test registers."""
    hub = HubApiDouble().start()
    yield hub
    hub.stop()


@dataclass
class FakeResult:
    table: pa.Table
    summary: dict[str, Any]


class FakeRefused(Exception):
    def __init__(self, code: str, reason: str, part: str | None = None):
        super().__init__(reason)
        self.code, self.reason, self.part = code, reason, part


class GuardDouble:
    """Test double of ``sekisho.guard.Guard`` (HTTP-layer unit tests only)."""

    VIEWS = {
        "residents": {"title": "住民", "purpose": "統計作成",
                      "columns": {"person_id": {"type": "string", "class": "privacy_unit"},
                                  "block": {"type": "string", "class": "dimension"},
                                  "age": {"type": "int64", "class": "dimension"}}},
    }

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        self.calls: list[tuple[str, Any]] = []

    def query(self, sql: str, *, user: str, mode: str = "threshold", epsilon: float | None = None, cancel=None):
        self.calls.append(("query", sql, user, mode, epsilon))
        if "slow" in sql:   # runs until cancelled (or 20 s), like a long DuckDB statement
            deadline = time.monotonic() + 20
            while not (cancel is not None and cancel.cancelled) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.calls.append(("cancelled" if cancel is not None and cancel.cancelled else "ran", sql))
            raise FakeRefused("cancelled", "the query was cancelled / 照会は取り消されました", None)
        if sql.lstrip().upper().startswith("SELECT *"):  # the outermost select only
            raise FakeRefused("row_level_output", "row-level output is not allowed / 個票は出せません",
                              "SELECT *")
        if "boom" in sql:
            raise RuntimeError("guard bug")
        table = pa.table({"block": ["北部", "中部"], "n": [120, None]})
        return FakeResult(table, {"mode": mode, "cells": 2, "cells_suppressed": 1,
                                  "query_id": 7, "notes_ja": "1 セルを秘匿しました",
                                  "epsilon_spent": epsilon})

    def describe(self, sql: str, *, user: str) -> pa.Schema:
        if sql.lstrip().upper().startswith("SELECT *"):  # the outermost select only
            raise FakeRefused("row_level_output", "row-level output is not allowed", "SELECT *")
        return pa.schema([("block", pa.string()), ("n", pa.int64())])

    def views(self, user: str) -> dict[str, Any]:
        return self.VIEWS

    def budget(self, user: str) -> dict[str, Any]:
        return {"period": "2026-11", "total": 10.0, "spent": 1.5, "remaining": 8.5}


class ServiceThread(_LoopThread):
    """A ``GuardService`` on a loopback port (the same application ``main`` serves)."""

    def __init__(self, service: Any) -> None:
        from sekisho.protocol import MAX_BODY_BYTES

        self.service = service
        super().__init__(service.make_app, max_body_size=MAX_BODY_BYTES)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.service.prefix}"


def hub_oauth(api_url: str) -> Any:
    """A real HubOAuth client pointed at ``api_url`` (the double or a real hub)."""
    from jupyterhub.services.auth import HubOAuth

    return HubOAuth(api_url=api_url, api_token="service-token-not-used-by-user-lookups",
                    oauth_client_id="service-guard", cache_max_age=1)


def json_body(response: Any) -> Any:
    return json.loads(response.content.decode("utf-8"))


def real_guard_instance(persons: int = 3000) -> Any:
    """An instance with a real store for the real guard (GUARD's ``make_instance``: users
    ``ana``/``ana2`` analysts, ``rep`` reports, ``stew`` steward), under /var/tmp so that
    the ``sekisho`` service account can reach it when a service process drops to it
    (pytest's own temporary directories are private to root)."""
    import os
    import tempfile
    from pathlib import Path

    from guard_fixtures import make_instance

    from sekisho.instance import secure_tree

    base = Path(tempfile.mkdtemp(prefix="sekisho-client-test-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    inst = make_instance(base / "home", persons=persons)
    secure_tree(inst.home)
    return inst


def remove_instance(inst: Any) -> None:
    import shutil

    shutil.rmtree(inst.home.parent, ignore_errors=True)


class ServiceProcess:
    """``python -m sekisho.services.guard`` as the hub would run it (a separate process,
    dropping to the service account when started as root)."""

    def __init__(self, home: Any, hub_api_url: str, port: int | None = None):
        self.home = home
        self.hub_api_url = hub_api_url
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/guard/"

    def start(self, timeout: float = 30) -> "ServiceProcess":
        import os
        import subprocess
        import sys
        import time

        import requests

        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
        env.update({
            "JUPYTERHUB_SERVICE_NAME": "guard",
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{self.port}",
            "JUPYTERHUB_SERVICE_PREFIX": "/services/guard/",
            "JUPYTERHUB_API_URL": self.hub_api_url,
            "JUPYTERHUB_API_TOKEN": "service-token-of-the-guard",
            "JUPYTERHUB_CLIENT_ID": "service-guard",
            "SEKISHO_HOME": str(self.home),
        })
        # the log goes to a file: a pipe nobody reads would block the service once full
        self.log = open(f"/var/tmp/sekisho-guard-test-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sekisho.services.guard"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"guard service exited: {self.log_tail()}")
            try:
                if requests.get(self.url + "api/openapi.yaml", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError("guard service did not start")

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")[-chars:]

    def kill9(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()  # start() reopens it

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
        import os

        if os.path.exists(self.log.name):
            os.unlink(self.log.name)
