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
  outside the instance (``sekisho audit head``) and pass it to ``verify``.

Writers take an exclusive ``flock`` on ``audit.lock``: several processes (CLI, hub,
guard service, reports service) append concurrently without forking the chain.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sekisho.instance import TOKYO, now_tokyo, secure

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head"
LOCK_NAME = "audit.lock"
CSV_FIELDS = ("seq", "ts", "type", "user", "role", "outcome", "summary", "details", "hash")


class AuditError(Exception):
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


class AuditLog:
    def __init__(self, directory: str | os.PathLike, *, key: bytes):
        self.dir = Path(directory)
        self.key = key
        self.path = self.dir / LOG_NAME
        self.head_path = self.dir / HEAD_NAME
        self.lock_path = self.dir / LOCK_NAME

    # ---- writing -----------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        created = not self.lock_path.exists()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        if created:
            secure(self.lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _mac(self, digest: str) -> str:
        return hmac.new(self.key, digest.encode(), hashlib.sha256).hexdigest()

    def _tail(self) -> tuple[int, str, int]:
        """(last seq, last hash, offset just past the last complete line)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0, GENESIS, 0
        chunk = 8192
        with open(self.path, "rb") as f:
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                buf = f.read(size - start)
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

    def append(self, type: str, *, user: str, outcome: str, role: str | None = None,
               summary: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one event and return it (with its seq and hash).

        Raises AuditError when the entry cannot be made durable; callers treat that
        as a refusal of the action being recorded (fail closed).
        """
        try:
            with self._locked():
                seq, prev, end = self._tail()
                torn = None
                if self.path.exists() and self.path.stat().st_size != end:
                    torn = self._cut_torn_tail(end)
                if torn is not None:
                    seq, prev = self._write(seq, prev, "audit.recovered", user="sekisho",
                                            role="service", outcome="ok",
                                            summary="an unfinished entry from a crashed writer was removed",
                                            details=torn)
                entry_seq, entry_hash_ = self._write(seq, prev, type, user=user, role=role,
                                                     outcome=outcome, summary=summary,
                                                     details=details or {})
                return {"seq": entry_seq, "hash": entry_hash_, "type": type}
        except OSError as exc:
            raise AuditError(f"cannot write the audit log at {self.path}: {exc}") from exc

    def _cut_torn_tail(self, end: int) -> dict[str, Any]:
        with open(self.path, "rb+") as f:
            f.seek(end)
            torn = f.read()
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return {"bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()}

    def _write(self, seq: int, prev: str, type: str, *, user: str, role: str | None,
               outcome: str, summary: str, details: dict[str, Any]) -> tuple[int, str]:
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
        entry["hash"] = entry_hash(entry)
        entry["mac"] = self._mac(entry["hash"])
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True, default=str) + "\n"
        new_file = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new_file:
            secure(self.path)
        self._write_head(entry["seq"], entry["hash"])
        return entry["seq"], entry["hash"]

    def _write_head(self, seq: int, digest: str) -> None:
        # Atomic (rename) but not fsynced: after a power cut the head may lag the log,
        # which verify accepts; what it catches is a head *ahead* of the log (entries cut).
        tmp = self.head_path.with_name(HEAD_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{seq} {digest} {self._mac(f'{seq}:{digest}')}\n".encode())
        finally:
            os.close(fd)
        if os.geteuid() == 0:
            secure(tmp)  # root (hub, CLI) must leave it readable by the service account
        os.replace(tmp, self.head_path)

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
        recorded = self._read_head()
        if recorded is not None:
            head_seq, head_hash, head_mac = recorded
            if not hmac.compare_digest(self._mac(f"{head_seq}:{head_hash}"), head_mac):
                problems.append(Problem(0, head_seq, "forged", "the head record's seal does not match"))
            elif head_seq > prev_seq:
                problems.append(Problem(last_line, prev_seq, "deleted",
                                        f"the log ends at seq {prev_seq} but the head records seq {head_seq}"))
            elif head_seq == prev_seq and head_hash != prev_hash:
                problems.append(Problem(last_line, prev_seq, "edited",
                                        "the last entry differs from the one the head records"))
            # head_seq < prev_seq: a writer died between appending and updating the head
        elif count:
            problems.append(Problem(0, None, "deleted", "the head record is missing"))
        if expect_head is not None and expect_head[1] not in position:
            problems.append(Problem(last_line, prev_seq, "deleted",
                                    f"the externally recorded head (seq {expect_head[0]}) is not in the log"))
        return VerifyResult(entries=count, head_seq=prev_seq, head_hash=prev_hash, problems=problems)

    def _read_head(self) -> tuple[int, str, str] | None:
        try:
            parts = self.head_path.read_text().split()
        except FileNotFoundError:
            return None
        if len(parts) != 3:
            return (-1, "", "")
        return int(parts[0]), parts[1], parts[2]


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
