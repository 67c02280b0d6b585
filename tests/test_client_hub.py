"""End to end on a REAL JupyterHub (tests/hub_fixtures.py): an analyst logs in with PAM,
starts a server, and a Sekisho kernel driven through the Jupyter server's REST and
websocket API queries the guard service; the kernel cannot read the instance; forged
and unsuitable tokens get 403; the guard service survives kill -9 (the hub restarts it).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections import Counter

import pytest
import requests

pytestmark = [pytest.mark.hub, pytest.mark.slow]

GROUPED = "SELECT block, count(*) AS n FROM residents GROUP BY block ORDER BY block"


# ---- driving a kernel through the single-user server --------------------------------------

class ServerKernel:
    """A kernel in the analyst's own server, used as a browser would (REST + websocket)."""

    def __init__(self, hub, user, token: str, kernel_name: str | None = "sekisho"):
        self.base = f"{hub.url}user/{user.name}/"
        self.headers = {"Authorization": f"token {token}"}
        body = {"name": kernel_name} if kernel_name else {}
        r = requests.post(self.base + "api/kernels", json=body, headers=self.headers, timeout=60)
        assert r.status_code == 201, (r.status_code, r.text[:500])
        self.model = r.json()
        self.id = self.model["id"]
        self.session = uuid.uuid4().hex

    def run(self, code: str, timeout: float = 120) -> tuple[str, dict]:
        """Execute ``code``; return (stdout+stderr+tracebacks, execute_reply content)."""
        return asyncio.run(self._run(code, timeout))

    async def _run(self, code: str, timeout: float) -> tuple[str, dict]:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = self.base.replace("http://", "ws://") + f"api/kernels/{self.id}/channels?session_id={self.session}"
        ws = await websocket_connect(HTTPRequest(url, headers=self.headers, connect_timeout=30))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": self.session, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        out, reply, idle = [], None, False
        deadline = time.monotonic() + timeout
        try:
            while not (idle and reply is not None):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"kernel did not answer in {timeout}s; output so far: {''.join(out)}")
                raw = await asyncio.wait_for(ws.read_message(), left)
                if raw is None:
                    raise ConnectionError("kernel websocket closed")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    out.append("\n".join(msg["content"]["traceback"]))
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif kind == "execute_reply":
                    reply = msg["content"]
        finally:
            ws.close()
        return "".join(out), reply

    def shutdown(self) -> None:
        requests.delete(self.base + f"api/kernels/{self.id}", headers=self.headers, timeout=60)


@pytest.fixture(scope="module")
def analyst_server(hub):
    if not hub.populated:
        pytest.skip("the hub fixture has no ingested data (synth/ingest unavailable)")
    analyst = hub.users["analyst"]
    session = hub.login(analyst)
    hub.start_server(analyst, session)
    token = hub.new_token(analyst, session=session)   # the analyst's own API token (REST access)
    return analyst, session, token


@pytest.fixture(scope="module")
def kernel(hub, analyst_server):
    analyst, _, token = analyst_server
    k = ServerKernel(hub, analyst, token)
    yield k
    k.shutdown()


def guard_url(hub) -> str:
    return f"http://127.0.0.1:{hub.ports['service_guard']}/services/guard/"


# ---- the analyst's kernel ---------------------------------------------------------------

def test_sekisho_kernel_is_offered_and_default(hub, analyst_server):
    analyst, _, token = analyst_server
    specs = requests.get(f"{hub.url}user/{analyst.name}/api/kernelspecs",
                         headers={"Authorization": f"token {token}"}, timeout=30).json()
    assert specs["kernelspecs"]["sekisho"]["spec"]["display_name"] == "Sekisho（安全な分析環境）"
    assert specs["default"] == "sekisho"


def test_kernel_greets_and_a_grouped_count_comes_back_protected(kernel, hub, analyst_server):
    analyst = analyst_server[0]
    out, reply = kernel.run(
        "import ibis, getpass\n"
        "c2 = ibis.sekisho.connect()\n"
        f"df = c2.sql({GROUPED!r}).execute()\n"
        "print('WHO', getpass.getuser(), type(con).__name__)\n"
        "import json\n"
        "print('ROWS', json.dumps({'rows': len(df), 'columns': sorted(df.columns),\n"
        "                          'mode': df.attrs['sekisho']['mode'], 'qid': df.attrs['sekisho']['query_id']}))\n")
    assert reply["status"] == "ok", out
    assert "関所（安全な分析環境）に接続しました" in out
    assert f"利用者: {analyst.name}（役割: 分析者）" in out
    assert "残り ε" in out
    assert f"WHO {analyst.name} Backend" in out          # the kernel runs as the analyst's OS user
    got = json.loads(next(l for l in out.splitlines() if l.startswith("ROWS"))[5:])
    assert got["rows"] == 13 and got["columns"] == ["block", "n"] and got["mode"] == "threshold"
    entry = [e for e in hub.instance.audit.entries(type="query") if e["seq"] == got["qid"]]
    assert entry and entry[0]["user"] == analyst.name and entry[0]["outcome"] == "ok"


def test_select_star_raises_the_guards_refusal_in_the_kernel(kernel):
    out, reply = kernel.run(
        "from sekisho.client import GuardRefusal\n"
        "try:\n"
        "    con.sql('SELECT * FROM residents').execute()\n"
        "    print('NOT REFUSED')\n"
        "except GuardRefusal as e:\n"
        "    print('REFUSED', e.code)\n")
    assert reply["status"] == "ok", out
    assert "NOT REFUSED" not in out
    assert "REFUSED row_level_output" in out or "REFUSED privacy_unit_in_expression" in out


def test_kernel_cannot_read_store_secret_audit_or_another_home(kernel, hub):
    inst = hub.instance
    from sekisho.store import Store

    store = Store(inst)
    targets = {
        "store": str(store.snapshots_dir / store.current_id() / "data.duckdb"),
        "current": str(store.current_path),
        "secret": str(inst.secret_path),
        "audit": str(inst.audit_dir / "audit.jsonl"),
        "state": str(inst.state_path),
        "other_home": os.path.expanduser(f"~{hub.users['admin'].name}"),
    }
    out, reply = kernel.run(
        "import json, os\n"
        f"targets = {targets!r}\n"
        "res = {}\n"
        "for k, p in targets.items():\n"
        "    try:\n"
        "        (os.listdir(p) if os.path.isdir(p) or k == 'other_home' else open(p, 'rb').read(1))\n"
        "        res[k] = 'READ'\n"
        "    except PermissionError:\n"
        "        res[k] = 'PermissionError'\n"
        "    except Exception as e:\n"
        "        res[k] = type(e).__name__\n"
        "print('RESULT', json.dumps(res))\n")
    assert reply["status"] == "ok", out
    result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[7:])
    assert result == {k: "PermissionError" for k in targets}, result


def test_forged_token_from_the_kernel_gets_403(kernel):
    out, reply = kernel.run(
        "import os, requests\n"
        "url = os.environ['SEKISHO_GUARD_URL'] + 'api/query'\n"
        "r = requests.post(url, json={'sql': 'SELECT block, count(*) FROM residents GROUP BY block'},\n"
        "                  headers={'Authorization': 'token forged0123456789abcdef'})\n"
        "print('STATUS', r.status_code, r.json()['code'])\n")
    assert "STATUS 403 invalid_token" in out, out


@pytest.mark.parametrize("role", ["manager", "admin"])
def test_tokens_of_other_roles_get_403(hub, role):
    user = hub.users[role]
    token = hub.new_token(user)
    r = requests.post(guard_url(hub) + "api/query", json={"sql": GROUPED},
                      headers={"Authorization": f"token {token}"}, timeout=30)
    assert r.status_code == 403
    assert "rows" not in r.text and r.json()["code"] in ("missing_scope", "role_not_allowed", "no_role")


def test_analyst_token_without_the_guard_scope_gets_403(hub, analyst_server):
    analyst, session, _ = analyst_server
    token = hub.new_token(analyst, scopes=[f"read:users!user={analyst.name}"], session=session)
    r = requests.get(guard_url(hub) + "api/views", headers={"Authorization": f"token {token}"}, timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "missing_scope"
    denied = [e for e in hub.instance.audit.entries(user=analyst.name, type="query.refused")
              if e["outcome"] == "denied" and e["details"].get("code") == "missing_scope"]
    assert denied


# ---- kill -9 of the managed service: the hub restarts it --------------------------------

def _guard_service_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (the guard service the hub started)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inode = parts[9]
    assert inode, f"nothing listens on {port}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    raise AssertionError(f"no process owns the socket on {port}")


def test_guard_service_killed_mid_load_is_restarted_by_the_hub_and_loses_nothing(hub, analyst_server):
    from sekisho.guard import Guard

    analyst = analyst_server[0]
    token = hub.server_token(analyst)     # what the analyst's kernel uses
    url = guard_url(hub) + "api/query"
    inst = hub.instance
    seq_before = inst.audit.head()[0]
    spent_before = Guard(inst).budget(analyst.name)["spent"]
    pid = _guard_service_pid(hub.ports["service_guard"])
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    assert "sekisho.services.guard" in cmdline
    answered, failures, unanswered = [], [], Counter()
    stop = threading.Event()
    eps = 0.01

    def client(i: int):
        s = requests.Session()
        s.headers["Authorization"] = f"token {token}"
        n = 0
        while not stop.is_set():
            n += 1
            dp = (n + i) % 2 == 0
            payload = {"sql": "SELECT sex, count(*) AS n FROM residents GROUP BY sex", "format": "json",
                       **({"mode": "dp", "epsilon": eps} if dp else {})}
            try:
                r = s.post(url, json=payload, timeout=60)
            except requests.RequestException:
                unanswered["dp" if dp else "threshold"] += 1
                time.sleep(0.5)
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            answered.append(r.json()["summary"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        at_kill = len(answered)
        os.kill(pid, 9)
        deadline = time.monotonic() + 120     # the hub polls its managed services
        while len(answered) < at_kill + 9 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert failures == []
    assert at_kill >= 9 and len(answered) >= at_kill + 9, "the hub did not restart the guard service"
    new_pid = _guard_service_pid(hub.ports["service_guard"])
    assert new_pid != pid
    verify = inst.audit.verify()
    assert verify.ok, [str(p) for p in verify.problems]
    audited = [e for e in inst.audit.entries(type="query") if e["seq"] > seq_before]
    entries = {e["seq"]: e for e in audited if e["type"] == "query"}
    requests_ = {e["seq"]: e for e in audited if e["type"] == "query.request"}
    ids = [s["query_id"] for s in answered]
    assert len(ids) == len(set(ids))
    assert all(i in entries and entries[i]["user"] == analyst.name for i in ids)
    # every answer's request entry came first (durable before the answer left)
    assert all(requests_[entries[i]["details"]["request"]]["user"] == analyst.name for i in ids)
    audited_dp = sum(e["details"]["epsilon_spent"] for e in entries.values()
                     if e["user"] == analyst.name and e["details"]["mode"] == "dp")
    spent = Guard(inst).budget(analyst.name)["spent"] - spent_before
    assert spent >= audited_dp - 1e-9 >= sum(s["epsilon_spent"] for s in answered if s["mode"] == "dp") - 1e-9
    assert spent <= audited_dp + unanswered["dp"] * eps + 1e-9


# ---- the API fuzzed through the hub's proxy with a real server token ------------------------

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (content_type_conformance, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

from sekisho.resources import resource_dir  # noqa: E402

SCHEMA = schemathesis.openapi.from_path(resource_dir("hub") / "guard-openapi.yaml")


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_through_the_proxy_with_real_hub_auth(case, hub, analyst_server):
    token = hub.server_token(analyst_server[0])
    case.call_and_validate(base_url=hub.url + "services/guard", headers={"Authorization": f"token {token}"},
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])
