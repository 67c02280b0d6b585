"""The audit trail: one append-only, hash-chained, sealed log of security events.

Each line of ``audit.jsonl`` is a JSON object::

    {"seq": 17, "ts": "2026-11-23T14:05:01.123+09:00", "type": "query",
     "user": "tanaka", "role": "analyst", "outcome": "ok", "summary": "...",
     "details": {...}, "prev": "<hash of entry 16>", "hash": "<sha256 of this entry>",
     "mac": "<HMAC-SHA256 of hash under the instance's audit key>"}

* ``hash`` covers every other field (canonical JSON), and ``prev`` links to the
  previous entry, so an edited, inserted, deleted or reordered entry breaks the chain.
* ``mac`` seals each hash with a key only the service account holds, so an insider who
  edits an entry cannot simply recompute the chain from there on.
* ``audit.head`` records the last sequence number and hash, so cutting entries off the
  end is detected too. For a guarantee against someone holding the key, record the head
  outside the instance (``sekisho audit head``) and pass it to ``verify``. It holds two
  fixed-size slots of 512 bytes (one per disk sector), each ``seq hash mac`` with its own
  CRC; entry ``seq`` overwrites slot ``seq % 2`` in place, so a write torn by a crash
  damages at most one slot and the other still holds the previous head. ``verify`` reports
  a damaged slot and checks the log against the intact one. (The single-line format of
  earlier versions is still read, and converted at the next append.)

Writers take an exclusive ``flock`` on ``audit.lock``: several processes (CLI, hub,
guard service, reports service) append concurrently without forking the chain. An entry
is written and fsync'd before ``append`` returns (``durable=False``: written, chained and
sealed, fsync'd by ``sync`` or the next durable append, the head moved only then — used for
an outcome whose request already has a durable entry). A writer keeps the lock, log and head
files open between appends, reopening any that was replaced or removed at its path
(checked by inode under the lock), and remembers the last seq and hash it wrote for as
long as the log's size and mtime show nobody else appended; forked children open their
own files (a shared lock file description would not exclude parent and child).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sekisho.errors import SekishoError
from sekisho.system import TOKYO, now_tokyo, secure

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head"
LOCK_NAME = "audit.lock"
CSV_FIELDS = ("seq", "ts", "type", "user", "role", "outcome", "summary", "details", "hash")


class AuditError(SekishoError):
    """The audit log could not be written; the action it records must not proceed."""


def _canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      default=str).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(entry)).hexdigest()


@dataclass
class Problem:
    line: int            # 1-based line number in audit.jsonl (0: the head file)
    seq: int | None
    kind: str            # edited | inserted | deleted | reordered | malformed | forged | truncated
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class VerifyResult:
    entries: int
    head_seq: int
    head_hash: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


HEAD_SLOT = 512          # one slot per disk sector: a torn write damages at most one slot
HEAD_MAGIC = "sekisho-audit-head/2"
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


@dataclass
class _HeadRecord:
    """What ``audit.head`` says: the sealed head to check the log against (``usable``)
    and what is wrong with the file itself."""
    seq: int
    digest: str
    problems: list[Problem] = field(default_factory=list)
    usable: bool = True


def _head_slot(seq: int, digest: str, mac: str) -> bytes:
    body = f"{seq} {digest} {mac}"
    text = f"{HEAD_MAGIC} {body} {zlib.crc32(body.encode()):08x}"
    return text.encode().ljust(HEAD_SLOT - 1, b" ") + b"\n"


def _parse_slot(raw: bytes) -> tuple[int, str, str] | None:
    """(seq, hash, mac) of an intact slot; None when torn or otherwise unreadable."""
    parts = raw.decode("ascii", "replace").split()
    if len(parts) != 5 or parts[0] != HEAD_MAGIC:
        return None
    body = " ".join(parts[1:4])
    if f"{zlib.crc32(body.encode()):08x}" != parts[4] or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2], parts[3]


class AuditLog:
    def __init__(self, directory: str | os.PathLike, *, key: bytes):
        self.dir = Path(directory)
        self.key = key
        self.path = self.dir / LOG_NAME
        self.head_path = self.dir / HEAD_NAME
        self.lock_path = self.dir / LOCK_NAME
        self._mac_base = hmac.new(key, digestmod=hashlib.sha256)
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

    def _mac(self, digest: str) -> str:
        m = self._mac_base.copy()
        m.update(digest.encode())
        return m.hexdigest()

    def _tail(self) -> tuple[int, str, int]:
        """(last seq, last hash, offset just past the last complete line)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0, GENESIS, 0
        try:
            return _read_tail(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

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

    # ---- reading -----------------------------------------------------------
    def _raw_lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for number, line in enumerate(f, start=1):
                yield number, line

    def entries(self, *, user: str | None = None, type: str | None = None,
                since: date | datetime | None = None, until: date | datetime | None = None,
                outcome: str | None = None) -> Iterator[dict[str, Any]]:
        """Entries in order, filtered. ``type`` matches exactly or as a dotted prefix."""
        since_dt = _as_datetime(since)
        until_dt = _as_datetime(until, end_of_day=True)
        for _, raw in self._raw_lines():
            if not raw.endswith(b"\n"):
                break  # an unfinished entry is not part of the trail
            e = json.loads(raw)
            if user is not None and e.get("user") != user:
                continue
            if type is not None and not (e["type"] == type or e["type"].startswith(type + ".")):
                continue
            if outcome is not None and e.get("outcome") != outcome:
                continue
            ts = datetime.fromisoformat(e["ts"])
            if since_dt is not None and ts < since_dt:
                continue
            if until_dt is not None and ts > until_dt:
                continue
            yield e

    def head(self) -> tuple[int, str]:
        seq, digest, _ = self._tail()
        return seq, digest

    def verify(self, *, expect_head: tuple[int, str] | None = None) -> VerifyResult:
        """Walk the whole chain and report every place where it is broken."""
        problems: list[Problem] = []
        # the head first: entries appended while the log is read only make the log longer
        recorded = self._read_head()
        parsed: list[tuple[int, dict[str, Any] | None, bool]] = []
        for number, raw in self._raw_lines():
            if not raw.endswith(b"\n"):
                parsed.append((number, None, True))
                break
            try:
                e = json.loads(raw)
                int(e["seq"]), e["hash"], e["prev"]
            except (ValueError, KeyError, TypeError):
                e = None
            parsed.append((number, e, False))
        position = {e["hash"]: i for i, (_, e, _) in enumerate(parsed) if e}

        prev_hash, prev_seq, count, last_line = GENESIS, 0, 0, 0
        for i, (number, e, torn) in enumerate(parsed):
            last_line = number
            if torn:
                problems.append(Problem(number, None, "truncated",
                                        "the last line is unfinished (a writer crashed mid-entry)"))
                break
            if e is None:
                problems.append(Problem(number, None, "malformed", "not a valid audit entry"))
                continue
            count += 1
            seq, digest, prev = int(e["seq"]), e["hash"], e["prev"]
            if entry_hash(e) != digest:
                problems.append(Problem(number, seq, "edited",
                                        "the entry's content does not match its hash"))
            elif not hmac.compare_digest(self._mac(digest), str(e.get("mac", ""))):
                problems.append(Problem(number, seq, "forged",
                                        "the entry's seal does not match (re-hashed without the audit key)"))
            if prev != prev_hash:
                j = position.get(prev)
                if j is not None and j > i:
                    kind, msg = "reordered", "links to an entry that stands later in the log"
                elif j is not None:
                    kind, msg = "inserted", (f"links to seq {parsed[j][1]['seq']}, so the entry or "
                                             "entries before it were inserted or moved")
                elif seq > prev_seq + 1:
                    kind, msg = "deleted", f"{seq - prev_seq - 1} entr(y/ies) missing before this one"
                else:
                    kind, msg = "inserted", "does not link to the entry before it"
                problems.append(Problem(number, seq, kind, msg))
            elif seq != prev_seq + 1:
                problems.append(Problem(number, seq, "reordered", f"sequence number {seq} after {prev_seq}"))
            prev_hash, prev_seq = digest, seq

        # the head file catches entries cut off the end of the log
        if recorded is not None:
            problems.extend(recorded.problems)
            head_seq, head_hash = recorded.seq, recorded.digest
            if recorded.usable and head_seq > prev_seq:
                problems.append(Problem(last_line, prev_seq, "deleted",
                                        f"the log ends at seq {prev_seq} but the head records seq {head_seq}"))
            elif recorded.usable and head_seq == prev_seq and head_hash != prev_hash:
                problems.append(Problem(last_line, prev_seq, "edited",
                                        "the last entry differs from the one the head records"))
            # head_seq < prev_seq: a writer died (or the power failed) between appending
            # and updating the head
        elif count:
            problems.append(Problem(0, None, "deleted", "the head record is missing"))
        if expect_head is not None and expect_head[1] not in position:
            problems.append(Problem(last_line, prev_seq, "deleted",
                                    f"the externally recorded head (seq {expect_head[0]}) is not in the log"))
        return VerifyResult(entries=count, head_seq=prev_seq, head_hash=prev_hash, problems=problems)

    def _read_head(self) -> _HeadRecord | None:
        """The recorded head (None: no head file). Read under a shared lock when the lock
        file can be opened, so an in-place slot write is never seen half done; without
        it, a damaged read is retried before it is reported."""
        for attempt in range(3):
            try:
                raw, locked = self._read_head_bytes()
            except FileNotFoundError:
                return None
            record = self._parse_head(raw)
            if not record.problems or locked or attempt == 2:
                return record
            time.sleep(0.02)
        return record

    def _read_head_bytes(self) -> tuple[bytes, bool]:
        try:
            lock = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            lock = None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_SH)
            with open(self.head_path, "rb") as f:
                return f.read(4 * HEAD_SLOT), lock is not None
        finally:
            if lock is not None:
                os.close(lock)  # releases the shared lock

    def _parse_head(self, raw: bytes) -> _HeadRecord:
        def sealed(seq: int, digest: str, mac: str) -> bool:
            return hmac.compare_digest(self._mac(f"{seq}:{digest}"), mac)

        if not raw.startswith(HEAD_MAGIC.encode()):
            parts = raw.split()   # the single-line format written before the slots
            try:
                seq, digest, mac = int(parts[0]), parts[1].decode(), parts[2].decode()
            except (IndexError, ValueError, UnicodeDecodeError):
                return _HeadRecord(-1, "", [Problem(0, None, "malformed", "the head record is unreadable")],
                                   usable=False)
            if len(parts) != 3 or not sealed(seq, digest, mac):
                return _HeadRecord(seq, digest, [Problem(0, seq, "forged", "the head record's seal does not match")],
                                   usable=False)
            return _HeadRecord(seq, digest)
        problems: list[Problem] = []
        good: list[tuple[int, str, str]] = []
        for i in range(2):
            slot = _parse_slot(raw[i * HEAD_SLOT:(i + 1) * HEAD_SLOT])
            if slot is None:
                problems.append(Problem(0, None, "malformed",
                                        f"head slot {i} is unreadable (a write torn by a crash, or "
                                        "tampering); the other slot is checked instead"))
            elif not sealed(*slot):
                problems.append(Problem(0, slot[0], "forged", f"the seal of head slot {i} does not match"))
            else:
                good.append(slot)
        if len(raw) != 2 * HEAD_SLOT and not problems:
            problems.append(Problem(0, None, "malformed", f"the head file has {len(raw)} bytes, not {2 * HEAD_SLOT}"))
        if not good:
            return _HeadRecord(-1, "", problems, usable=False)
        seq, digest, _ = max(good)
        return _HeadRecord(seq, digest, problems)


def _read_tail(fd: int, size: int) -> tuple[int, str, int]:
    """(last seq, last hash, offset just past the last complete line) of the log open as ``fd``."""
    if size == 0:
        return 0, GENESIS, 0
    chunk = 8192
    while True:
        start = max(0, size - chunk)
        buf = os.pread(fd, size - start, start)
        last_nl = buf.rfind(b"\n")
        if last_nl == -1:
            if start == 0:
                return 0, GENESIS, 0  # nothing but an unfinished line
            chunk *= 2
            continue
        before = buf.rfind(b"\n", 0, last_nl)
        if before == -1 and start > 0:
            chunk *= 2
            continue
        last = json.loads(buf[before + 1:last_nl])
        return int(last["seq"]), last["hash"], start + last_nl + 1


def _as_datetime(value: date | datetime | None, *, end_of_day: bool = False) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=TOKYO)
    t = datetime.max.time() if end_of_day else datetime.min.time()
    return datetime.combine(value, t, tzinfo=TOKYO)


def to_csv(entries: Iterator[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for e in entries:
        w.writerow([e.get("seq"), e.get("ts"), e.get("type"), e.get("user"), e.get("role") or "",
                    e.get("outcome"), e.get("summary", ""),
                    json.dumps(e.get("details", {}), ensure_ascii=False, sort_keys=True),
                    e.get("hash")])
    return buf.getvalue()
