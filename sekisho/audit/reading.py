"""Reading the audit trail: the entries in order, filtered by person, type, outcome and
period; the current head; and CSV export.

``AuditTrail`` is what a reader needs (paths, the seal key, verification); the writer,
``AuditLog``, extends it. An unfinished last line (a writer that crashed mid-entry) is
not part of the trail and is never returned.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sekisho.audit.chain import GENESIS, HEAD_NAME, LOCK_NAME, LOG_NAME, _read_tail
from sekisho.audit.verify import Verifier
from sekisho.system import TOKYO

CSV_FIELDS = ("seq", "ts", "type", "user", "role", "outcome", "summary", "details", "hash")


class AuditTrail(Verifier):
    """The trail in ``directory``, read and verified with the instance's audit ``key``."""

    def __init__(self, directory: str | os.PathLike, *, key: bytes):
        self.dir = Path(directory)
        self.key = key
        self.path = self.dir / LOG_NAME
        self.head_path = self.dir / HEAD_NAME
        self.lock_path = self.dir / LOCK_NAME
        self._mac_base = hmac.new(key, digestmod=hashlib.sha256)

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
