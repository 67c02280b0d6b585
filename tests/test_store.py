"""The store: snapshots, the atomic CURRENT pointer, read-only connections, retention."""

from __future__ import annotations

import duckdb
import pytest
import yaml

from sekisho.instance import Instance
from sekisho.store import Store, StoreError


@pytest.fixture
def inst(tmp_path):
    return Instance.create(tmp_path / "home")


def _snapshot(store: Store, rows: int, *, commit: bool = True):
    with store.writer(policy_version="test") as w:
        con = w.connect()
        con.execute(f"CREATE TABLE t AS SELECT range AS x FROM range({rows})")
        con.close()
        if commit:
            return w.commit()
        return None


def test_empty_store(inst):
    store = Store(inst)
    assert store.current() is None
    with pytest.raises(StoreError, match="nothing has been ingested"):
        store.connect()


def test_commit_switches_current_and_reads_are_read_only(inst):
    store = Store(inst)
    info = _snapshot(store, 5)
    cur = store.current()
    assert cur.id == info.id and cur.tables == {"t": 5} and cur.policy_version == "test"
    con = store.connect()
    assert con.table("t").count().execute() == 5
    with pytest.raises(Exception):
        con.raw_sql("CREATE TABLE evil AS SELECT 1")
    assert (inst.store_dir / "CURRENT").stat().st_mode & 0o077 == 0


def test_reader_keeps_its_snapshot_while_a_new_one_is_committed(inst):
    store = Store(inst)
    _snapshot(store, 5)
    reader = store.connect()
    _snapshot(store, 7)
    assert reader.table("t").count().execute() == 5
    assert store.connect().table("t").count().execute() == 7


def test_exception_inside_writer_removes_the_partial_snapshot(inst):
    store = Store(inst)
    first = _snapshot(store, 3)
    with pytest.raises(RuntimeError):
        with store.writer(policy_version="test") as w:
            c = w.connect()
            c.execute("CREATE TABLE t AS SELECT 1 AS x")
            c.close()
            raise RuntimeError("boom")
    assert store.current_id() == first.id
    assert not list(inst.store_dir.glob(".building-*"))
    assert [s.id for s in store.snapshots()] == [first.id]


def test_uncommitted_writer_is_discarded(inst):
    store = Store(inst)
    first = _snapshot(store, 3)
    _snapshot(store, 4, commit=False)
    assert store.current_id() == first.id and len(store.snapshots()) == 1


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(inst):
    store = Store(inst)
    first = _snapshot(store, 3)
    # a writer killed while building, and one killed after preparing but before switching
    (inst.store_dir / ".building-20991231T000000-aaaaaa").mkdir()
    with store.writer(policy_version="test") as w:
        c = w.connect()
        c.execute("CREATE TABLE t AS SELECT 1 AS x")
        c.close()
        orphan = w.prepare()
        w.committed = True   # simulate death before switch(): nothing cleans up
    assert store.current_id() == first.id
    assert orphan.id in {p.name for p in store.snapshots_dir.iterdir()}
    second = _snapshot(store, 2)
    names = {p.name for p in store.snapshots_dir.iterdir()}
    assert orphan.id not in names and {first.id, second.id} <= names
    assert not list(inst.store_dir.glob(".building-*"))
    e = list(inst.audit.entries(type="store.prune"))[-1]
    assert orphan.id in e["details"]["abandoned"] and "interrupted" in e["summary"]
    assert inst.audit.verify().ok


def test_prune_keeps_the_newest_and_audits_deletions(inst):
    store = Store(inst)
    ids = [_snapshot(store, n).id for n in range(1, 6)]
    removed = store.prune(2, user="hanako")
    assert removed == ids[:3]
    assert [s.id for s in store.snapshots()] == ids[3:]
    e = list(inst.audit.entries(type="store.prune"))[-1]
    assert e["details"]["removed"] == ids[:3] and e["user"] == "hanako"
    assert inst.audit.verify().ok
    assert store.prune(2) == []


def test_unknown_backend_is_a_clear_error(inst):
    cfg = yaml.safe_load(inst.config_path.read_text())
    cfg["store"] = {"backend": "postgres"}
    inst.config_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(StoreError, match=r"store.backend: unknown backend 'postgres' \(available: duckdb\)"):
        Store(Instance.open(inst.home))


def test_corrupt_pointer_is_refused(inst):
    store = Store(inst)
    _snapshot(store, 1)
    (inst.store_dir / "CURRENT").write_text("../../etc\n")
    with pytest.raises(StoreError, match="corrupt"):
        store.connect()


def test_second_concurrent_writer_is_refused(inst):
    store = Store(inst)
    with store.writer(policy_version="test"):
        with pytest.raises(StoreError, match="another ingest"):
            with Store(inst).writer(policy_version="test"):
                pass


def test_snapshot_files_are_private(inst):
    store = Store(inst)
    info = _snapshot(store, 1)
    for p in (store.snapshots_dir / info.id).rglob("*"):
        assert p.stat().st_mode & 0o077 == 0, p
    assert duckdb.connect(str(store.snapshots_dir / info.id / "data.duckdb"), read_only=True) \
        .execute("SELECT count(*) FROM t").fetchone() == (1,)


def _configured(inst, **store):
    cfg = yaml.safe_load(inst.config_path.read_text())
    cfg["store"] = {"backend": "duckdb", **store}
    inst.config_path.write_text(yaml.safe_dump(cfg))
    return Instance.open(inst.home)


def _settings(con) -> tuple[str, int]:
    memory, threads = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    return memory.replace(" ", "").upper(), threads


def test_every_store_connection_has_a_memory_limit_and_threads(inst):
    """DuckDB's default is 80% of RAM per database: the store's connections (readers,
    the writer) carry the configured limit, 2 GB and 2 threads unless config.yaml says."""
    store = Store(inst)
    _snapshot(store, 10)
    reader = store.connect(store.current_id()).con
    assert _settings(reader)[1] == 2 and _settings(reader)[0] in ("1.8GIB", "2.0GB", "1.9GIB", "1862.6MIB")
    reader.close()
    store = Store(_configured(inst, memory_limit="300MB", threads=1))
    with store.writer(policy_version="test") as w:
        writer = w.connect()
        assert _settings(writer) in (("286.1MIB", 1), ("300.0MB", 1))
        writer.close()
    reader = store.connect(store.current_id()).con
    assert _settings(reader) in (("286.1MIB", 1), ("300.0MB", 1))
    reader.close()


@pytest.mark.parametrize("section, message", [
    ({"memory_limit": 5}, "store.memory_limit: 5 is not a size"),
    ({"threads": 0}, "store.threads: 0 must be a positive integer"),
    ({"threads": "2"}, "store.threads: '2' must be a positive integer"),
])
def test_bad_store_limits_name_their_key(inst, section, message):
    with pytest.raises(StoreError, match=message):
        Store(_configured(inst, **section))
