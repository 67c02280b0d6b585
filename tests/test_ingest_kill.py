"""``kill -9`` of a real ``sekisho ingest`` process at several moments of its run leaves
the previous snapshot current and queryable and the audit chain valid; the next upload
cleans up whatever the killed one left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sekisho.instance import Instance
from sekisho.state import set_role
from sekisho.store import Store

from ingest_fixtures import write_mini_city

pytestmark = pytest.mark.slow


@pytest.fixture
def reachable_home():
    """The CLI drops to the service account, which must be able to reach the instance."""
    base = Path(tempfile.mkdtemp(prefix="sekisho-kill-test-"))
    base.chmod(0o755)
    yield base / "home"
    shutil.rmtree(base, ignore_errors=True)


def _cli(home: Path, src: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sekisho.cli", "ingest", str(src), "--home", str(home),
           "--quiet", "--extract-date", "2026-10-31", *extra]
    if os.geteuid() == 0:
        cmd += ["--as", "hanako"]
    env = {**os.environ, "SEKISHO_HOME": str(home)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _current_rows(inst: Instance) -> dict[str, int]:
    con = Store(inst).connect()
    return {t: con.table(t).count().execute() for t in con.list_tables()}


def test_kill_9_at_any_moment_leaves_the_previous_store(tmp_path, reachable_home):
    src = tmp_path / "export"
    write_mini_city(src, persons=20000)
    inst = Instance.create(reachable_home)
    set_role(inst, "hanako", "steward")
    if os.geteuid() != 0:
        set_role(inst, os.environ.get("USER") or "root", "steward")

    t0 = time.monotonic()
    first = _cli(reachable_home, src)
    out, err = first.communicate(timeout=300)
    full = time.monotonic() - t0
    assert first.returncode == 0, err.decode()
    store = Store(inst)
    good = store.current_id()
    rows = _current_rows(inst)
    assert rows["residents"] == 20000

    moments = [0.15, 0.3, 0.45, 0.55, 0.65, 0.72, 0.8, 0.85, 0.9, 0.95]
    killed = 0
    killed_pids: set[int] = set()
    for fraction in moments:
        p = _cli(reachable_home, src)
        time.sleep(full * fraction)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        # the store is the previous one, or (if the run finished first) a complete new one
        now = store.current_id()
        if p.returncode == -signal.SIGKILL:
            killed += 1
            killed_pids.add(p.pid)
        if now != good:
            # only a run that got past its commit may move CURRENT: then the new snapshot
            # is complete and its `ingest` entry is in the audit log
            committed = {e["details"]["snapshot"] for e in inst.audit.entries(type="ingest")
                         if e["type"] == "ingest"}
            assert now in committed, f"killed at {fraction:.0%}: CURRENT moved to an unaudited snapshot"
            good = now
        assert _current_rows(inst) == rows, f"killed at {fraction:.0%}: contents changed"
        result = inst.audit.verify()
        assert result.ok, f"killed at {fraction:.0%}: {[str(x) for x in result.problems]}"

    assert killed >= len(moments) // 2, "the runs finished before they could be killed"

    # the next upload succeeds and removes what the killed runs left behind
    final = _cli(reachable_home, src)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()
    assert _current_rows(inst) == rows
    assert not list(inst.store_dir.glob(".building-*"))
    cur = store.current_id()
    assert all(p.name <= cur for p in store.snapshots_dir.iterdir())
    # the killed runs' private working directories are gone (named after their pids)
    stale = [d for d in Path(tempfile.gettempdir()).glob("sekisho-ingest-*")
             if int(d.name.split("-")[2]) in killed_pids]
    assert not stale, stale
    assert inst.audit.verify().ok
