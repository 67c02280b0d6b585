"""`sekisho init` creates a private instance owned by the service account."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sekisho.instance import SERVICE_ACCOUNT, Instance, InstanceError

SEKISHO = [sys.executable, "-m", "sekisho.cli"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user and chowns")


@needs_root
def test_init_makes_everything_private_to_the_service_account(tmp_path: Path) -> None:
    home = tmp_path / "inst"
    out = subprocess.run([*SEKISHO, "init", "--home", str(home)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    secret = (home / "secret.key").read_text().strip()
    assert secret not in out.stdout + out.stderr  # generated, never printed
    uid = pwd.getpwnam(SERVICE_ACCOUNT).pw_uid
    for path in [home, *home.rglob("*")]:
        st = path.stat()
        assert st.st_uid == uid, f"{path} owned by uid {st.st_uid}"
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(st.st_mode) == expected, f"{path} has mode {oct(st.st_mode)}"


@needs_root
def test_another_os_user_cannot_read_the_instance(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # let 'nobody' reach the instance directory itself
    inst = Instance.create(tmp_path / "inst")
    for target in (inst.secret_path, inst.audit.path, inst.config_path):
        probe = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(target)],
                               capture_output=True, text=True)
        assert probe.returncode != 0
        assert "Permission denied" in probe.stderr


def test_init_refuses_to_overwrite_an_instance(tmp_path: Path) -> None:
    Instance.create(tmp_path / "inst")
    secret = (tmp_path / "inst" / "secret.key").read_bytes()
    with pytest.raises(InstanceError, match="already exists"):
        Instance.create(tmp_path / "inst")
    assert (tmp_path / "inst" / "secret.key").read_bytes() == secret


def test_open_names_the_missing_instance(tmp_path: Path) -> None:
    with pytest.raises(InstanceError, match="sekisho init"):
        Instance.open(tmp_path / "nowhere")


def test_init_is_audited_with_the_policy_version(tmp_path: Path) -> None:
    inst = Instance.create(tmp_path / "inst")
    (entry,) = list(inst.audit.entries())
    assert entry["type"] == "instance.init"
    assert entry["details"]["policy_version"] == inst.policy_version
    assert inst.policy_version.startswith("sha256:")
