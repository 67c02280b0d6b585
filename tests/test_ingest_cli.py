"""``sekisho ingest`` as a person runs it: a real subprocess (it drops privileges to the
service account when started as root), exit codes, messages, file ownership."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sekisho.instance import Instance
from sekisho.state import set_role
from sekisho.store import Store

from ingest_fixtures import COLUMNS, write_mini_city

ROOT = os.geteuid() == 0


@pytest.fixture
def setup(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="sekisho-cli-test-"))
    base.chmod(0o755)   # the service account must reach the instance after the drop
    inst = Instance.create(base / "home")
    set_role(inst, "hanako", "steward")
    set_role(inst, "taro", "analyst")
    src = tmp_path / "export"
    write_mini_city(src)
    src.chmod(0o700)    # only root can read the steward's export: files are opened before the drop
    yield inst, src
    shutil.rmtree(base, ignore_errors=True)


def run(inst: Instance, src: Path, *args: str, as_user: str | None = "hanako"):
    cmd = [sys.executable, "-m", "sekisho.cli", "ingest", str(src), "--home", str(inst.home),
           "--extract-date", "2026-10-31", *args]
    if as_user and ROOT:
        cmd += ["--as", as_user]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not ROOT, reason="acting for a steward needs root (--as)")
def test_steward_upload_as_root_is_owned_by_the_service_account(setup):
    inst, src = setup
    p = run(inst, src)
    assert p.returncode == 0, p.stderr
    assert "is now current" in p.stdout and "residents.csv: 48 rows" in p.stdout
    assert "residents.csv: encoding utf-8 (detected)" in p.stderr
    store = Store(inst)
    snap = store.snapshots_dir / store.current_id()
    sekisho_uid = pwd.getpwnam("sekisho").pw_uid
    for path in [snap, *snap.iterdir(), inst.store_dir / "CURRENT"]:
        assert path.stat().st_uid == sekisho_uid, path
        assert path.stat().st_mode & 0o077 == 0, path
    e = [e for e in inst.audit.entries(type="ingest") if e["type"] == "ingest"][-1]
    assert e["user"] == "hanako" and e["details"]["operator"] == "root"


@pytest.mark.skipif(not ROOT, reason="acting for another user needs root (--as)")
def test_non_steward_is_refused_with_exit_code_1(setup):
    inst, src = setup
    before = (inst.audit_dir / "audit.jsonl").read_bytes()
    p = run(inst, src, as_user="taro")
    assert p.returncode == 1
    assert "refused: only a steward may ingest data; taro has role analyst" in p.stderr
    assert Store(inst).current() is None
    assert (inst.audit_dir / "audit.jsonl").read_bytes().startswith(before)
    last = list(inst.audit.entries())[-1]
    assert (last["type"], last["outcome"], last["user"]) == ("ingest.failed", "denied", "taro")
    assert last["details"]["operator"] == "root"
    p = run(inst, src, as_user=None)   # root itself is not a steward
    assert p.returncode == 1 and "refused" in p.stderr


@pytest.mark.skipif(not ROOT, reason="acting for a steward needs root (--as)")
def test_bad_input_exits_1_naming_file_line_column(setup):
    inst, src = setup
    assert run(inst, src).returncode == 0
    current = Store(inst).current_id()
    for name in COLUMNS:
        p = src / name
        p.write_bytes(p.read_text(encoding="utf-8").encode("cp932"))
    p = run(inst, src, "--encoding", "utf-8")
    assert p.returncode == 1
    assert "error:" in p.stderr and "residents.csv:2" in p.stderr and "--encoding cp932" in p.stderr
    assert Store(inst).current_id() == current and inst.audit.verify().ok
    p = run(inst, src, "--encoding", "cp932")
    assert p.returncode == 0, p.stderr
    assert Store(inst).current_id() != current
