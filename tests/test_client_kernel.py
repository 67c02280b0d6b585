"""The "Sekisho（安全な分析環境）" kernelspec: installs, starts, pre-connects, greets.

A real IPython kernel is started from the installed kernelspec with jupyter_client; the
guard service runs on loopback with the guard double (the hub test drives the same kernel
through a real single-user server).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from sekisho.client.kernel import DISPLAY_NAME, install_kernelspec
from sekisho.instance import Instance
from sekisho.services.guard import GuardService
from sekisho.state import set_role
from client_fixtures import GUARD_SCOPE, FakeRefused, GuardDouble, HubApiDouble, ServiceThread, hub_oauth

TOKEN = "tok-kernel-analyst"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("prefix")
    installed = Path(install_kernelspec(prefix))
    assert installed == prefix / "share" / "jupyter" / "kernels" / "sekisho"
    return installed.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hub = HubApiDouble().start()
    hub.add_token(TOKEN, "tanaka", [GUARD_SCOPE])
    inst = Instance.create(tmp_path_factory.mktemp("krn") / "home")
    set_role(inst, "tanaka", "analyst")
    svc = GuardService(inst, hub_auth=hub_oauth(hub.api_url), guard_factory=GuardDouble,
                       refusal_types=(FakeRefused,), workers=2)
    thread = ServiceThread(svc).start()
    yield thread
    thread.stop()
    hub.stop()


def run_cell(kc, code: str, timeout: float = 60) -> tuple[str, dict]:
    msg_id = kc.execute(code)
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=timeout)
    return "".join(out), reply["content"]


def start_kernel(kernel_dir: Path, env: dict[str, str]):
    km = KernelManager(kernel_name="sekisho",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "JUPYTERHUB_"))}
    km.start_kernel(env={**base, **env})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def test_kernelspec_names_and_python(kernel_dir):
    spec = json.loads((kernel_dir / "sekisho" / "kernel.json").read_text(encoding="utf-8"))
    assert spec["display_name"] == DISPLAY_NAME == "Sekisho（安全な分析環境）"
    assert spec["argv"][0] == "/opt/sekisho/venv/bin/python"


def test_kernel_preconnects_and_greets_in_japanese(kernel_dir, served):
    km, kc = start_kernel(kernel_dir, {"SEKISHO_GUARD_URL": served.url, "JUPYTERHUB_API_TOKEN": TOKEN})
    try:
        out, reply = run_cell(kc, "print(type(con).__module__, con.list_tables())")
        assert reply["status"] == "ok", out
        assert "関所（安全な分析環境）に接続しました" in out
        assert "利用者: tanaka（役割: 分析者）" in out
        assert "residents（住民）" in out
        assert "残り ε = 8.50 / 10.00" in out
        assert "sekisho.client ['residents']" in out
        out2, _ = run_cell(kc, "t = con.table('residents'); print(t.group_by('block').agg(n=t.count()).execute().attrs['sekisho']['query_id'])")
        assert "関所" not in out2          # the greeting is shown once
        assert out2.strip() == "7"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernel_starts_and_explains_when_the_guard_is_unreachable(kernel_dir):
    km, kc = start_kernel(kernel_dir, {"SEKISHO_GUARD_URL": "http://127.0.0.1:9/services/guard/",
                                       "JUPYTERHUB_API_TOKEN": TOKEN})
    try:
        out, reply = run_cell(kc, "print(con is None)")
        assert "関所サービスに接続できませんでした" in out
        assert out.strip().endswith("True")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
