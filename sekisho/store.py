"""The store: immutable snapshots of the abstracted tables plus an atomic ``CURRENT`` pointer.

Layout inside ``instance.store_dir``::

    CURRENT                      the id of the current snapshot (replaced with os.replace)
    snapshots/<id>/meta.json     SnapshotInfo (id, created_at, tables + row counts, policy_version)
    snapshots/<id>/data.duckdb   the tables (duckdb backend)
    .building-<id>/              a snapshot being written; renamed into snapshots/ when complete

An ingest writes a whole new snapshot, fsyncs it, renames it into ``snapshots/`` and
switches ``CURRENT`` last, so a crash or ``kill -9`` at any point leaves the previous
snapshot current. Leftover ``.building-*`` directories (from a killed writer) are removed
by the next writer. Readers resolve ``CURRENT`` once when they connect and keep that
snapshot's file open, so an ingest never disturbs a running query.

Backends follow the ibis pattern: one small class per engine behind one interface,
chosen by ``config.yaml: store.backend`` (only ``duckdb`` is implemented).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sekisho.errors import SekishoError
from sekisho.instance import Instance, now_tokyo, secure

CURRENT_NAME = "CURRENT"
SNAPSHOTS_DIR = "snapshots"
BUILDING_PREFIX = ".building-"
META_NAME = "meta.json"
LOCK_NAME = "writer.lock"
DEFAULT_KEEP = 3


class StoreError(SekishoError):
    """The store cannot be used as asked (no snapshot, unknown backend, corrupt pointer...)."""


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    created_at: str
    tables: dict[str, int]                 # table name -> row count
    policy_version: str
    backend: str = "duckdb"
    details: dict[str, Any] = field(default_factory=dict)


# ---- backends ------------------------------------------------------------------


# DuckDB's default memory limit is 80% of RAM *per database*: every connection the
# store opens gets these unless config.yaml says otherwise (store.memory_limit, store.threads)
DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_THREADS = 2


class DuckDBSnapshotBackend:
    """One DuckDB file per snapshot, opened read-only through ibis. Its engine is imported
    when used, so a store configured with another backend never loads DuckDB."""

    name = "duckdb"
    data_file = "data.duckdb"

    def __init__(self, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS):
        self.settings = {"memory_limit": memory_limit, "threads": int(threads)}

    def connect(self, snapshot_dir: Path):
        import ibis

        path = snapshot_dir / self.data_file
        if not path.exists():
            raise StoreError(f"snapshot {snapshot_dir.name} has no data file")
        backend = ibis.duckdb.connect(str(path), read_only=True)
        self.limit(backend.con)
        return backend

    def open_for_writing(self, building_dir: Path):
        import duckdb

        path = building_dir / self.data_file
        con = duckdb.connect(str(path))
        self.limit(con)
        return con

    def limit(self, con) -> None:
        """Set the memory limit and threads on an open connection. Set, not passed as
        connect-time configuration: DuckDB refuses a second connection to a file with a
        different configuration in the same process (a reader beside the guard's)."""
        con.execute(f"SET memory_limit = '{_sql_str(self.settings['memory_limit'])}'")
        con.execute(f"SET threads = {int(self.settings['threads'])}")

    def attach(self, con, building_dir: Path, alias: str) -> None:
        """Attach the snapshot being built to another DuckDB connection (the ingest's
        in-memory working database), so tables are written with one SQL statement."""
        path = building_dir / self.data_file
        con.execute(f"ATTACH '{_sql_str(str(path))}' AS {alias}")

    def table_counts(self, building_dir: Path) -> dict[str, int]:
        import duckdb

        with duckdb.connect(str(building_dir / self.data_file), read_only=True) as con:
            self.limit(con)
            names = [r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'main' ORDER BY table_name").fetchall()]
            return {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


BACKENDS = {"duckdb": DuckDBSnapshotBackend}


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


# ---- the store -----------------------------------------------------------------


class Store:
    def __init__(self, instance: Instance):
        self.instance = instance
        self.dir = Path(instance.store_dir)
        section = instance.config.get("store") or {}
        backend_name = section.get("backend", "duckdb")
        try:
            backend_class = BACKENDS[backend_name]
        except KeyError:
            raise StoreError(
                f"config.yaml: store.backend: unknown backend {backend_name!r} "
                f"(available: {', '.join(sorted(BACKENDS))})") from None
        memory_limit = section.get("memory_limit", DEFAULT_MEMORY_LIMIT)
        threads = section.get("threads", DEFAULT_THREADS)
        if not isinstance(memory_limit, str) or not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)",
                                                                 memory_limit.strip()):
            raise StoreError(f"config.yaml: store.memory_limit: {memory_limit!r} is not a size such as '2GB'")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise StoreError(f"config.yaml: store.threads: {threads!r} must be a positive integer")
        self.backend = backend_class(memory_limit=memory_limit.strip(), threads=threads)
        self.connection_settings = dict(self.backend.settings)
        self._pointer: tuple[tuple, str] | None = None   # (identity of CURRENT, its id)
        self._current_str = str(self.dir / CURRENT_NAME)   # stat on every guard request: no pathlib

    @property
    def snapshots_dir(self) -> Path:
        return self.dir / SNAPSHOTS_DIR

    @property
    def current_path(self) -> Path:
        return self.dir / CURRENT_NAME

    # ---- reading ---------------------------------------------------------------
    def current_id(self) -> str | None:
        """The current snapshot's id. CURRENT is read again only when the file at its
        path changed (commits replace it with os.replace: a new inode), so the guard's
        per-query check costs one stat."""
        path = self._current_str
        cached = self._pointer
        if cached is not None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            if cached[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                return cached[1]
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                text = f.read().decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        if not text or "/" in text or text.startswith("."):
            raise StoreError(f"{self.current_path}: the CURRENT pointer is corrupt")
        self._pointer = (identity, text)
        return text

    def current(self) -> SnapshotInfo | None:
        sid = self.current_id()
        return None if sid is None else self.info(sid)

    def info(self, snapshot_id: str) -> SnapshotInfo:
        path = self.snapshots_dir / snapshot_id / META_NAME
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"snapshot {snapshot_id} is missing (CURRENT points to it)") from None
        return SnapshotInfo(**meta)

    def snapshots(self) -> list[SnapshotInfo]:
        """Complete snapshots, oldest first."""
        if not self.snapshots_dir.exists():
            return []
        out = []
        for d in sorted(self.snapshots_dir.iterdir()):
            if (d / META_NAME).exists():
                out.append(self.info(d.name))
        return out

    def connect(self, snapshot_id: str | None = None):
        """A read-only ibis backend on the current (or a named) snapshot."""
        sid = snapshot_id or self.current_id()
        if sid is None:
            raise StoreError("the store is empty: nothing has been ingested yet (run `sekisho ingest`)")
        return self.backend.connect(self.snapshots_dir / sid)

    # ---- writing ---------------------------------------------------------------
    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        secure(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError("another ingest is writing the store; try again when it has finished") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def writer(self, *, policy_version: str, user: str = "sekisho") -> Iterator["SnapshotWriter"]:
        """Build a new snapshot. On normal exit the caller must have called ``commit()``
        (which switches CURRENT); on an exception the partial snapshot is removed.
        Leftovers of an interrupted writer are removed first, and that is audited (a run
        killed between its ``ingest`` audit entry and the switch left a complete snapshot
        that never became current: the audit trail says so)."""
        with self._writer_lock():
            removed = self.remove_abandoned()
            if removed:
                self.instance.audit.append(
                    "store.prune", user=user, outcome="ok",
                    summary=f"removed {len(removed)} snapshot(s) left by an interrupted ingest "
                            "(never current)",
                    details={"abandoned": removed, "current": self.current_id()})
            w = SnapshotWriter(self, policy_version=policy_version)
            try:
                yield w
            except BaseException:
                w.abort()
                raise
            else:
                if not w.committed:
                    w.abort()

    def remove_abandoned(self) -> list[str]:
        """Delete snapshot directories a killed writer left behind (never the current one)."""
        removed = []
        if not self.dir.exists():
            return removed
        for d in self.dir.iterdir():
            if d.name.startswith(BUILDING_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        current = self.current_id()
        if self.snapshots_dir.exists():
            for d in self.snapshots_dir.iterdir():
                # CURRENT always moves to the newest snapshot, so a complete snapshot newer
                # than the current one was prepared by a writer killed before it switched
                orphan = current is None or d.name > current
                if d.name != current and (orphan or not (d / META_NAME).exists()):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
        return removed

    def prune(self, keep: int = DEFAULT_KEEP, *, user: str = "sekisho") -> list[str]:
        """Keep the newest ``keep`` snapshots (always including the current one); audit deletions."""
        current = self.current_id()
        snaps = [s.id for s in self.snapshots()]
        doomed = [s for s in snaps[:-keep] if s != current] if keep > 0 else []
        if not doomed:
            return []
        self.instance.audit.append(
            "store.prune", user=user, outcome="ok",
            summary=f"removed {len(doomed)} old snapshot(s), kept {keep}",
            details={"removed": doomed, "current": current, "keep": keep})
        for sid in doomed:
            shutil.rmtree(self.snapshots_dir / sid, ignore_errors=True)
        return doomed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def new_snapshot_id(after: str | None = None) -> str:
    """Time-ordered id (microseconds); always sorts after ``after`` (the current id),
    which ``remove_abandoned`` relies on."""
    while True:
        sid = now_tokyo().strftime("%Y%m%dT%H%M%S%f") + "-" + secrets.token_hex(3)
        if after is None or sid > after:
            return sid
        time.sleep(0.001)


class SnapshotWriter:
    """A snapshot under construction in ``.building-<id>``."""

    def __init__(self, store: Store, *, policy_version: str):
        self.store = store
        self.policy_version = policy_version
        self.id = new_snapshot_id(after=store.current_id())
        self.dir = store.dir / f"{BUILDING_PREFIX}{self.id}"
        self.dir.mkdir(mode=0o700)
        secure(self.dir)
        self.committed = False

    def attach(self, con, alias: str = "snap") -> None:
        """Attach the snapshot file to a DuckDB connection as ``alias``."""
        self.store.backend.attach(con, self.dir, alias)

    def connect(self):
        """A writable DuckDB connection to the snapshot file (for small writes and tests)."""
        return self.store.backend.open_for_writing(self.dir)

    def prepare(self, details: dict[str, Any] | None = None) -> SnapshotInfo:
        """Seal the snapshot: count rows, write meta, fsync, rename into ``snapshots/``.
        The snapshot is complete but not yet current."""
        tables = self.store.backend.table_counts(self.dir)
        info = SnapshotInfo(id=self.id, created_at=now_tokyo().isoformat(timespec="seconds"),
                            tables=tables, policy_version=self.policy_version,
                            backend=self.store.backend.name, details=details or {})
        meta = self.dir / META_NAME
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(asdict(info), ensure_ascii=False, indent=1).encode())
        finally:
            os.close(fd)
        for p in self.dir.iterdir():
            secure(p)
        _fsync_tree(self.dir)
        self.store.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        secure(self.store.snapshots_dir)
        final = self.store.snapshots_dir / self.id
        os.rename(self.dir, final)
        _fsync_dir(self.store.snapshots_dir)
        _fsync_dir(self.store.dir)
        self.dir = final
        self.info = info
        return info

    def switch(self) -> None:
        """Make the prepared snapshot current (atomic pointer replacement)."""
        tmp = self.store.dir / (CURRENT_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (self.id + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        secure(tmp)
        os.replace(tmp, self.store.current_path)
        _fsync_dir(self.store.dir)
        self.committed = True

    def commit(self, details: dict[str, Any] | None = None) -> SnapshotInfo:
        info = self.prepare(details)
        self.switch()
        return info

    def abort(self) -> None:
        if self.committed:
            return
        if self.store.current_id() != self.id:
            shutil.rmtree(self.dir, ignore_errors=True)
