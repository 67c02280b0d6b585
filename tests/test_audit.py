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
    assert '"rows":400' in ls[3]
    ls[3] = ls[3].replace('"rows":400', '"rows":401')
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


# ---- durability and the in-place head (the writer keeps its files open) -------------------

def spy_fsync(monkeypatch) -> list[tuple[int, int]]:
    """Record (inode, size) of every file fsync'd from now on."""
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_append_is_durable_fsync_on_the_log_before_append_returns(instance: Instance, monkeypatch) -> None:
    synced = spy_fsync(monkeypatch)
    entry = instance.audit.append("query", user="tanaka", outcome="ok", details={"q": 1})
    st = instance.audit.path.stat()
    # the log itself, already holding the new entry, was fsync'd before append returned
    assert (st.st_ino, st.st_size) in synced
    assert lines(instance)[-1].startswith("{") and json.loads(lines(instance)[-1])["seq"] == entry["seq"]


def test_a_not_yet_durable_entry_is_readable_and_sync_makes_it_durable_then_heads_it(
        instance: Instance, monkeypatch) -> None:
    synced = spy_fsync(monkeypatch)
    head_before = instance.audit._read_head().seq
    entry = instance.audit.append("query", user="tanaka", outcome="ok", details={"q": 1}, durable=False)
    st = instance.audit.path.stat()
    assert (st.st_ino, st.st_size) not in synced                  # written, not yet fsync'd ...
    assert json.loads(lines(instance)[-1])["seq"] == entry["seq"]  # ... but chained and readable
    assert instance.audit._read_head().seq == head_before          # the head never runs ahead of the disk
    assert instance.audit.verify().ok                              # a lagging head is accepted
    instance.audit.sync()
    assert (st.st_ino, st.st_size) in synced
    assert instance.audit._read_head().seq == entry["seq"]
    synced.clear()
    instance.audit.sync()                                          # nothing pending: no fsync
    assert synced == []


def test_a_durable_append_also_makes_earlier_undurable_entries_durable(instance: Instance) -> None:
    first = instance.audit.append("query", user="tanaka", outcome="ok", durable=False)
    other = AuditLog(instance.audit.dir, key=instance.audit.key)   # another writer (e.g. the CLI)
    second = other.append("login", user="sato", outcome="ok")
    instance.audit.sync()   # its pending entry is no longer the tail: the other writer's head stands
    assert instance.audit._read_head().seq == second["seq"] > first["seq"]
    assert instance.audit.verify().ok


def test_failed_fsync_refuses_the_action_and_the_next_append_recovers(instance: Instance, monkeypatch) -> None:
    from sekisho.audit import AuditError

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(AuditError):
        instance.audit.append("query", user="tanaka", outcome="ok")
    monkeypatch.undo()
    instance.audit.append("query", user="tanaka", outcome="ok")
    assert instance.audit.verify().ok


def test_head_is_written_in_place_two_sealed_slots(instance: Instance) -> None:
    from sekisho.audit import HEAD_SLOT

    inode = instance.audit.head_path.stat().st_ino
    for i in range(3):
        instance.audit.append("query", user="tanaka", outcome="ok", details={"i": i})
    assert instance.audit.head_path.stat().st_ino == inode   # no tmp file + rename per append
    assert not (instance.audit.dir / "audit.head.tmp").exists()
    raw = instance.audit.head_path.read_bytes()
    assert len(raw) == 2 * HEAD_SLOT
    seqs = sorted(int(raw[i * HEAD_SLOT:(i + 1) * HEAD_SLOT].split()[1]) for i in range(2))
    assert seqs == [9, 10]  # the last head and the one before it
    assert instance.audit.verify().ok


def _tear_newest_head_slot(inst: Instance) -> None:
    from sekisho.audit import HEAD_SLOT

    seq = inst.audit.head()[0]
    with open(inst.audit.head_path, "r+b") as f:
        f.seek((seq % 2) * HEAD_SLOT + 40)
        f.write(b"\x00garbage")


def test_a_torn_head_slot_is_reported_and_falls_back_to_the_other_slot(instance: Instance) -> None:
    _tear_newest_head_slot(instance)
    found = kinds(instance)
    assert found == [(0, "malformed")]  # the torn slot is reported; the log itself is intact
    # the previous head (seq 6) still guards the end of the log: cutting entries below it is found
    rewrite(instance, lines(instance)[:-2])
    result = instance.audit.verify()
    assert any(p.kind == "deleted" and "head records seq 6" in p.message for p in result.problems)


def test_a_new_writer_repairs_a_torn_head_slot(instance: Instance) -> None:
    from sekisho.audit import AuditLog

    _tear_newest_head_slot(instance)
    fresh = AuditLog(instance.audit.dir, key=instance.audit_key)   # e.g. the service after a power cut
    fresh.append("query", user="tanaka", outcome="ok")
    assert fresh.verify().ok


def test_forged_head_slot_is_found(instance: Instance) -> None:
    from sekisho.audit import HEAD_SLOT, _head_slot

    seq, digest = instance.audit.head()
    with open(instance.audit.head_path, "r+b") as f:  # an intact slot, but sealed without the key
        f.seek(((seq + 1) % 2) * HEAD_SLOT)
        f.write(_head_slot(seq + 1, digest, "0" * 64))
    assert (0, "forged") in kinds(instance)


def test_old_single_line_head_is_read_and_converted(instance: Instance) -> None:
    seq, digest = instance.audit.head()
    mac = instance.audit._mac(f"{seq}:{digest}")
    instance.audit.head_path.write_text(f"{seq} {digest} {mac}\n")
    assert instance.audit.verify().ok
    rewrite(instance, lines(instance)[:-1])
    assert any(k == "deleted" for _, k in kinds(instance))     # still guards the end of the log
    instance.audit.head_path.write_text(f"{seq - 1} {digest} {'0' * 64}\n")
    assert (0, "forged") in kinds(instance)
    instance.audit.append("query", user="tanaka", outcome="ok")  # converted to the slot format
    assert instance.audit.verify().ok
    assert instance.audit.head_path.read_bytes().startswith(b"sekisho-audit-head/2 ")


def test_missing_head_is_deleted(instance: Instance) -> None:
    instance.audit.head_path.unlink()
    assert (0, "deleted") in kinds(instance)
    instance.audit.append("query", user="tanaka", outcome="ok")   # the writer recreates it
    assert instance.audit.verify().ok


def test_writer_follows_a_replaced_log_file(instance: Instance) -> None:
    # the writer keeps the log open; a log replaced at its path (restored, rotated) is reopened
    path = instance.audit.path
    copy = path.with_name("copy.jsonl")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)
    instance.audit.append("query", user="tanaka", outcome="ok")
    assert [e["seq"] for e in instance.audit.entries()] == list(range(1, 9))
    assert instance.audit.verify().ok
    # a lock file removed meanwhile is recreated: writers never lock two different files
    instance.audit.lock_path.unlink()
    instance.audit.append("query", user="tanaka", outcome="ok")
    assert instance.audit.lock_path.exists()
    assert instance.audit.verify().ok


def test_two_writers_in_one_process_interleave_on_one_chain(instance: Instance) -> None:
    from sekisho.audit import AuditLog

    other = AuditLog(instance.audit.dir, key=instance.audit_key)   # stands for another process
    for i in range(5):
        instance.audit.append("query", user="a", outcome="ok", details={"i": i})
        other.append("query", user="b", outcome="ok", details={"i": i})
    seqs = [e["seq"] for e in instance.audit.entries()]
    assert seqs == list(range(1, 18))
    assert instance.audit.verify().ok


def test_threads_share_one_writer_without_forking_the_chain(instance: Instance) -> None:
    import threading

    def work(w: int) -> None:
        for i in range(40):
            instance.audit.append("query", user=f"t{w}", outcome="ok", details={"i": i})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = instance.audit.verify()
    assert result.ok, result.problems
    assert result.entries == 7 + 4 * 40


def _hammer_inherited(inst: Instance, worker: int, n: int) -> None:
    for i in range(n):
        inst.audit.append("query", user=f"f{worker}", outcome="ok", details={"i": i})


def test_forked_writers_do_not_share_the_parents_lock(instance: Instance) -> None:
    # the parent already holds its lock file open; forked children inherit the AuditLog
    instance.audit.append("query", user="parent", outcome="ok")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer_inherited, args=(instance, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    _hammer_inherited(instance, 9, 40)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = instance.audit.verify()
    assert result.ok, result.problems
    assert result.entries == 8 + 4 * 40
