"""Writing the audit trail: ``AuditLog.append`` adds one hash-chained, sealed entry,
durable before it returns, and moves the head.

Writers take an exclusive ``flock`` on ``audit.lock``: several processes (CLI, hub,
guard service, reports service) append concurrently without forking the chain. An entry
is written and fsync'd before ``append`` returns (``durable=False``: written, chained and
sealed, fsync'd by ``sync`` or the next durable append, the head moved only then — used for
an outcome whose request already has a durable entry). A writer keeps the lock, log and head
files open between appends, reopening any that was replaced or removed at its path
(checked by inode under the lock), and remembers the last seq and hash it wrote for as
long as the log's size and mtime show nobody else appended; forked children open their
own files (a shared lock file description would not exclude parent and child).

The head file holds two slots; entry ``seq`` overwrites slot ``seq % 2`` in place, so a
write torn by a crash damages at most one slot and the other still holds the previous
head. (The single-line format of earlier versions is still read, and converted at the
next append.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sekisho.audit.chain import HEAD_NAME, HEAD_SLOT, _canonical, _head_slot, _parse_slot, _read_tail
from sekisho.audit.reading import AuditTrail
from sekisho.errors import SekishoError
from sekisho.system import now_tokyo, secure


class AuditError(SekishoError):
    """The audit log could not be written; the action it records must not proceed."""


_open_logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # a forked child must open its own lock file description: flock does not exclude
    # two processes sharing one (and a thread of the parent may have held the mutex)
    for log in list(_open_logs):
        log._close_handles()
        log._reset_handles()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class _Handle:
    """A file kept open between appends, with the identity it had when opened."""
    fd: int
    dev: int
    ino: int

    def same_file(self, st: os.stat_result) -> bool:
        return st.st_dev == self.dev and st.st_ino == self.ino


class AuditLog(AuditTrail):
    """The trail, appended to by this process (reading and verifying: ``AuditTrail``)."""

    def __init__(self, directory: str | os.PathLike, *, key: bytes):
        super().__init__(directory, key=key)
        self._reset_handles()
        _open_logs.add(self)

    def _reset_handles(self) -> None:
        """Forget every open file (after a fork: the child must not share the parent's
        lock file description, or flock would no longer exclude the two)."""
        self._mutex = threading.Lock()   # threads of this process; flock excludes processes
        self._pid = os.getpid()
        self._lock: _Handle | None = None
        self._log: _Handle | None = None
        self._head: _Handle | None = None
        # (size, mtime_ns) of the log after our last append, and its last seq and hash
        self._tail_state: tuple[int, int, int, str] | None = None
        # (seq, hash, prev) of the last entry written with durable=False and not yet fsync'd
        self._unsynced: tuple[int, str, str] | None = None
        self._dir_ready = False

    def _close_handles(self) -> None:
        if self._log is not None and self._unsynced is not None:
            try:
                os.fsync(self._log.fd)   # entries written with durable=False
                self._unsynced = None
            except OSError:
                pass
        for handle in (self._lock, self._log, self._head):
            if handle is not None:
                try:
                    os.close(handle.fd)
                except OSError:
                    pass
        self._lock = self._log = self._head = None
        self._tail_state = None

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self._close_handles()

    # ---- writing -----------------------------------------------------------
    @staticmethod
    def _open(path: Path, flags: int) -> tuple[_Handle, bool]:
        """Open (creating with 0600 if missing); returns the handle and whether it was created."""
        try:
            fd = os.open(path, flags)
            created = False
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(path, flags)
                created = False
        st = os.fstat(fd)
        return _Handle(fd, st.st_dev, st.st_ino), created

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._pid != os.getpid():
            self._reset_handles()   # forked without the at-fork hook (e.g. os.fork from C)
        with self._mutex:
            if not self._dir_ready:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._dir_ready = True
            while True:
                if self._lock is None:
                    self._lock, created = self._open(self.lock_path, os.O_RDWR)
                    if created:
                        secure(self.lock_path)
                fcntl.flock(self._lock.fd, fcntl.LOCK_EX)
                # the lock file must still be the one at its path (if it was removed or
                # replaced, another writer may be holding a lock on the new file)
                try:
                    current = os.stat(self.lock_path)
                except FileNotFoundError:
                    current = None
                if current is not None and self._lock.same_file(current):
                    break
                fcntl.flock(self._lock.fd, fcntl.LOCK_UN)
                os.close(self._lock.fd)
                self._lock = None
            try:
                yield
            except BaseException:
                self._close_handles()   # state after a failed write is unknown: reopen next time
                raise
            finally:
                if self._lock is not None:
                    fcntl.flock(self._lock.fd, fcntl.LOCK_UN)

    def _log_handle(self) -> tuple[_Handle, os.stat_result]:
        """The log, kept open; reopened when the file at its path is another one
        (rotated, replaced, removed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._log is not None and (st is None or not self._log.same_file(st)):
            if self._unsynced is not None:
                os.fsync(self._log.fd)   # entries written to the file being replaced
                self._unsynced = None
            os.close(self._log.fd)
            self._log = None
            self._tail_state = None
        if self._log is None:
            self._log, created = self._open(self.path, os.O_RDWR | os.O_APPEND)
            if created:
                secure(self.path)
            st = os.fstat(self._log.fd)
        return self._log, st

    def append(self, type: str, *, user: str, outcome: str, role: str | None = None,
               summary: str = "", details: dict[str, Any] | None = None,
               durable: bool = True) -> dict[str, Any]:
        """Append one event and return it (with its seq and hash) once it is durable
        (written and fsync'd).

        ``durable=False`` returns once the entry is written (readable by every process,
        chained and sealed) but before the fsync; ``sync`` (or any later durable append,
        by any writer) makes it durable. Only for an entry whose action already has a
        durable record of its own — the guard's query outcome, after its request entry.

        Raises AuditError when the entry cannot be written (made durable); callers
        treat that as a refusal of the action being recorded (fail closed).
        """
        try:
            with self._locked():
                log, st = self._log_handle()
                cached = self._tail_state
                if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                    seq, prev, end = cached[2], cached[3], st.st_size   # nobody wrote since our append
                else:
                    seq, prev, end = _read_tail(log.fd, st.st_size)
                if st.st_size != end:
                    torn = self._cut_torn_tail(log.fd, end)
                    seq, prev = self._write(log.fd, seq, prev, "audit.recovered", user="sekisho",
                                            role="service", outcome="ok",
                                            summary="an unfinished entry from a crashed writer was removed",
                                            details=torn)
                entry_seq, entry_hash_ = self._write(log.fd, seq, prev, type, user=user, role=role,
                                                     outcome=outcome, summary=summary,
                                                     details=details or {}, durable=durable)
                return {"seq": entry_seq, "hash": entry_hash_, "type": type}
        except OSError as exc:
            raise AuditError(f"cannot write the audit log at {self.path}: {exc}") from exc

    def sync(self) -> None:
        """Make the entries this process appended with ``durable=False`` durable, and
        record the head if the last of them is still the log's last entry."""
        if self._unsynced is None:
            return
        try:
            with self._locked():
                pending = self._unsynced
                if pending is None:
                    return   # a durable append made them durable meanwhile
                log, st = self._log_handle()
                os.fsync(log.fd)
                self._unsynced = None
                cached = self._tail_state
                if cached is not None and cached[2] == pending[0] and cached[0] == st.st_size \
                        and cached[1] == st.st_mtime_ns:
                    self._write_head(*pending)
        except OSError as exc:
            raise AuditError(f"cannot make the audit log at {self.path} durable: {exc}") from exc

    @staticmethod
    def _cut_torn_tail(fd: int, end: int) -> dict[str, Any]:
        size = os.fstat(fd).st_size
        torn = os.pread(fd, size - end, end)
        os.ftruncate(fd, end)
        os.fsync(fd)
        return {"bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()}

    def _write(self, fd: int, seq: int, prev: str, type: str, *, user: str, role: str | None,
               outcome: str, summary: str, details: dict[str, Any], durable: bool = True) -> tuple[int, str]:
        entry: dict[str, Any] = {
            "seq": seq + 1,
            "ts": now_tokyo().isoformat(timespec="milliseconds"),
            "type": type,
            "user": user,
            "role": role,
            "outcome": outcome,
            "summary": summary,
            "details": details,
            "prev": prev,
        }
        # the line is the canonical body with the hash and seal appended: one encoding,
        # and verify's re-encoding of the parsed line gives the same body back
        body = _canonical(entry)
        entry["hash"] = hashlib.sha256(body).hexdigest()
        entry["mac"] = self._mac(entry["hash"])
        data = body[:-1] + f',"hash":"{entry["hash"]}","mac":"{entry["mac"]}"}}\n'.encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if not durable:
            st = os.fstat(fd)
            self._tail_state = (st.st_size, st.st_mtime_ns, entry["seq"], entry["hash"])
            # the head must never be ahead of what is durable: it is recorded by sync()
            self._unsynced = (entry["seq"], entry["hash"], prev)
            return entry["seq"], entry["hash"]
        os.fsync(fd)   # durable before append returns: the caller releases the action only then
        self._unsynced = None   # the fsync covered every earlier write too
        st = os.fstat(fd)
        self._tail_state = (st.st_size, st.st_mtime_ns, entry["seq"], entry["hash"])
        self._write_head(entry["seq"], entry["hash"], prev)
        return entry["seq"], entry["hash"]

    def _write_head(self, seq: int, digest: str, prev: str) -> None:
        """Record the head in place: slot ``seq % 2`` of ``audit.head`` (one pwrite into
        its own sector, each slot with its own checksum), so a torn write damages at most
        one slot and the other keeps the previous head. Not fsynced: after a power cut
        the head may lag the log, which verify accepts; what it catches is a head *ahead*
        of the log (entries cut)."""
        try:
            st = os.stat(self.head_path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_size != 2 * HEAD_SLOT:   # missing, old format or damaged
            self._new_head_file(seq, digest, prev)
            return
        if self._head is not None and not self._head.same_file(st):
            os.close(self._head.fd)
            self._head = None
        if self._head is None:
            self._head, _ = self._open(self.head_path, os.O_RDWR)
            # first write through this handle: repair the other slot if a crash tore it
            other = ((seq - 1) % 2) * HEAD_SLOT
            if _parse_slot(os.pread(self._head.fd, HEAD_SLOT, other)) is None:
                os.pwrite(self._head.fd, _head_slot(seq - 1, prev, self._mac(f"{seq - 1}:{prev}")), other)
        os.pwrite(self._head.fd, _head_slot(seq, digest, self._mac(f"{seq}:{digest}")),
                  (seq % 2) * HEAD_SLOT)

    def _new_head_file(self, seq: int, digest: str, prev: str) -> None:
        """Create (or convert a missing, old-format or damaged) head file with both slots
        filled, atomically, then keep it open for in-place updates."""
        if self._head is not None:
            os.close(self._head.fd)
            self._head = None
        slots = [b"", b""]
        slots[seq % 2] = _head_slot(seq, digest, self._mac(f"{seq}:{digest}"))
        slots[(seq - 1) % 2] = _head_slot(seq - 1, prev, self._mac(f"{seq - 1}:{prev}"))
        tmp = self.head_path.with_name(HEAD_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, slots[0] + slots[1])
        finally:
            os.close(fd)
        if os.geteuid() == 0:
            secure(tmp)  # root (hub, CLI) must leave it readable by the service account
        os.replace(tmp, self.head_path)
        self._head, _ = self._open(self.head_path, os.O_RDWR)
