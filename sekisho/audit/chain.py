"""The audit trail's on-disk format: file names, how an entry is hashed, the head
file's sealed slots, and finding the last complete entry of the log.

Shared by the writer (``sekisho.audit.log``) and the readers and verifier, which must
agree on it byte for byte: an entry's ``hash`` is the SHA-256 of its canonical JSON
(every field but ``hash`` and ``mac``), and a head slot is ``magic seq hash mac crc``
padded to one disk sector, so a torn write damages at most one slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head"
LOCK_NAME = "audit.lock"


def _canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      default=str).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(entry)).hexdigest()


HEAD_SLOT = 512          # one slot per disk sector: a torn write damages at most one slot
HEAD_MAGIC = "sekisho-audit-head/2"


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
