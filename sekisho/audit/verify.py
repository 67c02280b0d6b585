"""Verifying the chain: walk the whole log, check every hash, seal and link, and check
the log's end against the sealed head, reporting every place where it is broken
(``VerifyResult``).

Kept apart from writing because it is the auditors' side of the trail: it never takes
the exclusive lock, reads a log that others may be appending to, and must name each kind
of tampering (edited, inserted, deleted, reordered, forged, truncated) precisely.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sekisho.audit.chain import GENESIS, HEAD_MAGIC, HEAD_SLOT, _parse_slot, entry_hash


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


@dataclass
class _HeadRecord:
    """What ``audit.head`` says: the sealed head to check the log against (``usable``)
    and what is wrong with the file itself."""
    seq: int
    digest: str
    problems: list[Problem] = field(default_factory=list)
    usable: bool = True


class Verifier:
    """``verify`` and the reading of the head file, mixed into ``AuditTrail``, which
    provides ``head_path``, ``lock_path``, ``_raw_lines`` and ``_mac``."""

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
