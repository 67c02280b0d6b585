"""The audit trail detects every edit, deletion, insertion and reordering, and
concurrent writers in several processes never fork or corrupt the chain."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sekisho.audit import AuditLog, entry_hash
from sekisho.instance import Instance

SEKISHO = [sys.executable, "-m", "sekisho.cli"]


@pytest.fixture()
def instance(tmp_path: Path) -> Instance:
    inst = Instance.create(tmp_path / "inst")
    for i in range(2, 8):
        inst.audit.append("ingest", user=f"steward{i}", outcome="ok", summary=f"upload {i}",
                          details={"rows": i * 100})
    return inst


def lines(inst: Instance) -> list[str]:
    return inst.audit.path.read_text(encoding="utf-8").splitlines(keepends=True)


def rewrite(inst: Instance, new_lines: list[str]) -> None:
    inst.audit.path.write_text("".join(new_lines), encoding="utf-8")


def kinds(inst: Instance) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in inst.audit.verify().problems]


def test_intact_chain_verifies(instance: Instance) -> None:
    result = instance.audit.verify()
    assert result.ok, result.problems
    assert result.entries == 7
    assert result.head_seq == 7


def test_edited_entry_is_found_at_its_line(instance: Instance) -> None:
    ls = lines(instance)
    ls[3] = ls[3].replace('"rows": 400', '"rows": 401')
    rewrite(instance, ls)
    assert (4, "edited") in kinds(instance)


def test_edited_and_rehashed_entry_is_found_by_its_seal(instance: Instance) -> None:
    # an insider recomputes the hash (and every later link) but lacks the audit key
    ls = [json.loads(line) for line in lines(instance)]
    ls[2]["user"] = "someone-else"
    prev = ls[1]["hash"]
    for e in ls[2:]:
        e["prev"] = prev
        e["hash"] = entry_hash(e)
        prev = e["hash"]
    rewrite(instance, [json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in ls])
    found = kinds(instance)
    assert (3, "forged") in found
    # every re-hashed entry fails its seal, and so does the head record
    assert sum(1 for _, k in found if k == "forged") >= 5


def test_deleted_entry_is_found(instance: Instance) -> None:
    ls = lines(instance)
    del ls[2]
    rewrite(instance, ls)
    assert (3, "deleted") in kinds(instance)


def test_entries_cut_off_the_end_are_found(instance: Instance) -> None:
    rewrite(instance, lines(instance)[:-2])
    assert any(k == "deleted" for _, k in kinds(instance))


def test_externally_recorded_head_catches_a_rewound_log(instance: Instance) -> None:
    seq, digest = instance.audit.head()
    before = lines(instance)
    # roll back the log and its head file together to an earlier state
    head_backup = instance.audit.head_path.read_bytes()
    instance.audit.append("query", user="x", outcome="ok")
    rewrite(instance, before)
    instance.audit.head_path.write_bytes(head_backup)
    assert instance.audit.verify().ok  # consistent on its own...
    later = instance.audit.verify(expect_head=(seq + 1, "f" * 64))
    assert any(p.kind == "deleted" for p in later.problems)  # ...but not with the recorded head
    assert instance.audit.verify(expect_head=(seq, digest)).ok


def test_reordered_entries_are_found(instance: Instance) -> None:
    ls = lines(instance)
    ls[2], ls[3] = ls[3], ls[2]
    rewrite(instance, ls)
    found = kinds(instance)
    assert (3, "reordered") in found or (4, "reordered") in found


def test_inserted_entry_is_found(instance: Instance) -> None:
    ls = lines(instance)
    fake = json.loads(ls[2])
    fake["summary"] = "fabricated"
    fake["hash"] = entry_hash(fake)
    ls.insert(3, json.dumps(fake, ensure_ascii=False, sort_keys=True) + "\n")
    rewrite(instance, ls)
    found = kinds(instance)
    assert (4, "forged") in found
    assert (5, "inserted") in found


def test_torn_last_line_is_reported_then_recovered_by_the_next_writer(instance: Instance) -> None:
    with open(instance.audit.path, "ab") as f:
        f.write(b'{"seq": 8, "ts": "2026')  # a writer killed mid-entry
    assert any(p.kind == "truncated" for p in instance.audit.verify().problems)
    instance.audit.append("query", user="tanaka", outcome="ok")
    result = instance.audit.verify()
    assert result.ok, result.problems
    types = [e["type"] for e in instance.audit.entries()]
    assert types[-2:] == ["audit.recovered", "query"]


def _hammer(home: str, worker: int, n: int) -> None:
    inst = Instance.open(home)
    for i in range(n):
        inst.audit.append("query", user=f"w{worker}", outcome="ok", details={"i": i})


def test_concurrent_writers_in_several_processes_keep_one_chain(instance: Instance) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(instance.home), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = instance.audit.verify()
    assert result.ok, result.problems
    assert result.entries == 7 + 4 * 60
    seqs = [e["seq"] for e in instance.audit.entries()]
    assert seqs == list(range(1, len(seqs) + 1))


def test_filters(instance: Instance) -> None:
    instance.audit.append("query.refused", user="tanaka", outcome="refused")
    instance.audit.append("query", user="tanaka", outcome="ok")
    assert [e["type"] for e in instance.audit.entries(type="query")] == ["query.refused", "query"]
    assert len(list(instance.audit.entries(user="tanaka", outcome="refused"))) == 1
    assert list(instance.audit.entries(user="nobody")) == []


def run_cli(*args: str, env_home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    return subprocess.run([*SEKISHO, *args], capture_output=True, text=True, env=env)


def test_cli_verify_exits_nonzero_and_says_where(instance: Instance) -> None:
    ok = run_cli("audit", "verify", "--home", str(instance.home))
    assert ok.returncode == 0, ok.stderr
    assert "audit chain OK" in ok.stdout
    ls = lines(instance)
    ls[4] = ls[4].replace("steward", "stewart")
    rewrite(instance, ls)
    broken = run_cli("audit", "verify", "--home", str(instance.home))
    assert broken.returncode == 1
    assert "line 5" in broken.stderr and "edited" in broken.stderr


def test_cli_show_filters_exports_csv_and_is_itself_audited(instance: Instance) -> None:
    out = run_cli("audit", "show", "--home", str(instance.home), "--user", "steward3", "--csv")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()
    assert rows[0].startswith("seq,ts,type,user")
    assert len(rows) == 2 and "steward3" in rows[1]
    last = list(instance.audit.entries())[-1]
    assert last["type"] == "audit.read"
    assert last["details"]["filters"]["user"] == "steward3"
    assert instance.audit.verify().ok
