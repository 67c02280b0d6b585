"""``sekisho demo`` end to end: a small city, one person per role, a running hub; re-runnable."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from hub_fixtures import SEKISHO, free_port, hub_prerequisites

pytestmark = [pytest.mark.hub, pytest.mark.slow]

READY = "The Sekisho demo is ready"


@pytest.fixture
def demo_place():
    reason = hub_prerequisites()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="sekisho-demotest-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    prefix = f"skt-d{secrets.token_hex(2)}-"
    yield base / "parent" / "instance", prefix  # "parent" does not exist yet: the demo makes it
    for role in ("analyst", "admin", "manager", "steward"):
        name = prefix + role
        for pid in subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run([SEKISHO, "users", "remove", name, "--delete-account", "--home", str(base / "parent" / "instance")],
                       capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def passwords_in(output: str, prefix: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(rf"^\s+({re.escape(prefix)}\w+)\s+(\S+)\s", output, re.M)}


def login_landing(url: str, name: str, password: str) -> str | None:
    session = requests.Session()
    session.get(url + "hub/login")
    response = session.post(url + "hub/login", allow_redirects=False,
                            data={"username": name, "password": password, "_xsrf": session.cookies.get("_xsrf")})
    return response.headers.get("Location") if response.status_code == 302 else None


def test_demo_sets_up_everything_and_can_be_run_again(demo_place):
    home, prefix = demo_place
    port = free_port()
    out_path = home.parent.parent / "demo.out"
    args = [SEKISHO, "demo", "--home", str(home), "--population", "300", "--port", str(port), "--no-reports",
            "--user-prefix", prefix]
    with open(out_path, "w") as out:
        demo = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while READY not in out_path.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, out_path.read_text()[-3000:]
            time.sleep(1)
        output = out_path.read_text()
        assert READY in output and "関所（Sekisho）デモ環境の準備ができました" in output
        passwords = passwords_in(output, prefix)
        assert set(passwords) == {prefix + r for r in ("analyst", "admin", "manager", "steward")}
        url = f"http://127.0.0.1:{port}/"
        assert login_landing(url, prefix + "analyst", passwords[prefix + "analyst"]) == "/hub/spawn"
        assert login_landing(url, prefix + "admin", passwords[prefix + "admin"]) == "/services/audit/"
        assert login_landing(url, prefix + "manager", passwords[prefix + "manager"]) in (
            "/services/reports/", "/hub/home")
        assert login_landing(url, prefix + "analyst", "wrong") is None
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C: the demo stops its hub
        demo.wait(60)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "hub/api/", timeout=2)

    # again: the instance and the data are reused, the passwords renewed
    again = subprocess.run(args + ["--no-hub"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "既存のインスタンスを使います" in again.stdout
    assert "登録済みのデータを使います" in again.stdout
    renewed = passwords_in(again.stdout, prefix)
    assert renewed.keys() == passwords.keys() and renewed != passwords

    verify = subprocess.run([SEKISHO, "audit", "verify", "--home", str(home)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
