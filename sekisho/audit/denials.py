"""Denied requests (HTTP 401/403) on record, aggregated per source and minute.

Every 401 or 403 answered by the hub or a Sekisho service is a denial the audit trail
must show (who, what path, when). Recording each one as its own entry would let anyone
able to send requests — no credential needed — grow the chain at the rate they send
them, burying the entries that matter. ``DenialLog`` bounds that:

* A denial falls into a **bucket**: the minute it happened in (Tokyo time), the service,
  the source, the route (the handler, not the raw path: a service has few), the status
  and the code. The **source** is the person when the hub identified one (with the
  credential they presented: a short digest of the token, never the token), otherwise
  the client address — an unauthenticated request proves nothing else about who sent it.
* The **first** denial of a bucket is written at once, as the service's own entry type
  (``query.refused`` at the guard, ``report.view`` at the reports service, ``audit.read``
  at the audit review, ``access.denied`` at the hub), with the path, the address and the
  time: evidence is on record before the answer leaves.
* The **others** of the bucket are only counted (with up to ``MAX_PATHS`` distinct paths,
  the first and last time); once the minute is over, one ``access.denied`` entry per bucket
  records them (``details.count``, ``details.aggregated: true``, ``details.first_seq``
  linking the bucket's first entry). A background thread writes them every
  ``flush_seconds``; ``flush_all`` (tests, shutdown) writes every bucket at once.
* At most ``max_buckets`` buckets are opened per minute; a denial arriving beyond that
  (e.g. a flood with a forged ``X-Forwarded-For`` per request) goes to one overflow bucket
  per minute, written only as the aggregate (``source: "(overflow)"``, the number of
  distinct sources it held).

So a flood adds at most ``2 * max_buckets + 1`` entries per minute and service, however
many requests it sends. What may be lost: the counts of the current minute if the process
dies before its flush (the first denial of each bucket is already durable).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sekisho.system import now_tokyo

log = logging.getLogger(__name__)

DENIAL_TYPE = "access.denied"
LOGIN_SERVICE = "hub-login"   # the hub's failed logins (``sekisho.hub.auth``), aggregated the same way
UNAUTHENTICATED = "(unauthenticated)"
OVERFLOW = "(overflow)"
MAX_PATHS = 10              # distinct paths kept per bucket
MAX_PATH_CHARS = 200        # a path is attacker input: kept short
MAX_BUCKETS = 100           # buckets opened per minute and service, beyond them: one overflow bucket
MAX_SOURCES_COUNTED = 1000  # distinct sources counted in the overflow bucket
FLUSH_SECONDS = 10.0

_logs: weakref.WeakSet[DenialLog] = weakref.WeakSet()


def credential_digest(token: str | None) -> str | None:
    """A short digest naming the credential a request presented (never the token)."""
    if not token:
        return None
    return "token:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def minute_of(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M")


@dataclass(frozen=True)
class Denial:
    """One denied request, as a service saw it."""
    status: int
    code: str
    path: str
    route: str = "*"
    user: str | None = None
    role: str | None = None
    remote_ip: str | None = None
    credential: str | None = None
    why: str = ""
    claimed: str | None = None   # a name the request claimed, not verified (a failed login's)

    @property
    def source(self) -> str:
        if self.user:
            return f"user:{self.user}" + (f" ({self.credential})" if self.credential else "")
        return f"ip:{self.remote_ip or '?'}" + (f" claimed:{self.claimed}" if self.claimed else "")


@dataclass
class _Bucket:
    minute: str
    denial: Denial              # the first denial (who, route, status, code)
    first_seq: int | None = None
    first_ts: str | None = None
    count: int = 0              # denials counted after the first (the aggregate's count)
    last_ts: str | None = None
    paths: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    overflow: bool = False

    def add(self, denial: Denial, ts: str) -> None:
        self.count += 1
        self.first_ts = self.first_ts or ts
        self.last_ts = ts
        path = denial.path[:MAX_PATH_CHARS]
        if path not in self.paths and len(self.paths) < MAX_PATHS:
            self.paths.append(path)
        if len(self.sources) < MAX_SOURCES_COUNTED:
            self.sources.add(denial.source)


class DenialLog:
    """Aggregated denials of one service (``service``) into ``audit`` (an ``AuditLog``).

    ``record(denial, first=...)``: ``first`` writes the service's own entry for the first
    denial of a bucket and returns it (default: an ``access.denied`` entry with count 1).
    """

    def __init__(self, audit: Any, service: str, *, max_buckets: int = MAX_BUCKETS,
                 flush_seconds: float | None = FLUSH_SECONDS, clock: Callable[[], datetime] = now_tokyo):
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.audit = audit
        self.service = service
        self.max_buckets = max_buckets
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple, _Bucket] = {}
        self._opened: dict[str, int] = {}         # buckets opened per minute
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        _logs.add(self)

    # ---- recording ---------------------------------------------------------
    def record(self, denial: Denial, first: Callable[[Denial], dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Put ``denial`` on record: the first of its bucket now (the entry is returned;
        an ``AuditError`` propagates), the others counted for the minute's aggregate."""
        now = self.clock()
        minute, ts = minute_of(now), now.isoformat(timespec="milliseconds")
        key = (minute, denial.source, denial.route, denial.status, denial.code)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None and self._opened.get(minute, 0) >= self.max_buckets:
                key = (minute, OVERFLOW)
                bucket = self._buckets.get(key)
                if bucket is None:
                    bucket = self._buckets[key] = _Bucket(minute, denial, overflow=True)
                bucket.add(denial, ts)
                self._start_thread()
                return None
            if bucket is not None:
                bucket.add(denial, ts)
                self._start_thread()
                return None
            bucket = self._buckets[key] = _Bucket(minute, denial)
            self._opened[minute] = self._opened.get(minute, 0) + 1
        try:
            entry = (first or self._first_entry)(denial)
        except BaseException:
            with self._lock:   # nothing is on record: let the next denial of the bucket try again
                if self._buckets.get(key) is bucket and bucket.count == 0:
                    del self._buckets[key]
                    self._opened[minute] -= 1
            raise
        bucket.first_seq = (entry or {}).get("seq")
        self._start_thread()
        return entry

    def _first_entry(self, denial: Denial) -> dict[str, Any]:
        return self.audit.append(
            DENIAL_TYPE, user=denial.user or UNAUTHENTICATED, role=denial.role, outcome="denied",
            summary=f"{self.service}: {denial.status} {denial.code} {denial.path[:MAX_PATH_CHARS]}",
            details={**self.details(denial), "count": 1, "aggregated": False})

    def details(self, denial: Denial) -> dict[str, Any]:
        """What every entry of a denial says: service, status, code, path, source, address."""
        return {"service": self.service, "status": denial.status, "code": denial.code,
                "path": denial.path[:MAX_PATH_CHARS], "route": denial.route, "source": denial.source,
                "remote_ip": denial.remote_ip, "why": denial.why[:300],
                **({"claimed": denial.claimed} if denial.claimed else {})}

    # ---- aggregates ----------------------------------------------------------
    def flush(self, *, everything: bool = False) -> int:
        """Write the aggregate of every bucket whose minute is over (``everything``: of
        every bucket); returns the number of entries written. A bucket whose entry cannot
        be written is kept for the next flush."""
        current = minute_of(self.clock())
        with self._lock:
            due = [(k, b) for k, b in self._buckets.items() if everything or b.minute < current]
            for k, _ in due:
                del self._buckets[k]
            for minute in [m for m in self._opened if everything or m < current]:
                del self._opened[minute]
        written = 0
        for n, (key, bucket) in enumerate(due):
            if bucket.count == 0:
                continue
            try:
                self._write_aggregate(bucket)
                written += 1
            except Exception as exc:
                log.error("cannot audit %d denials of %s (%s): %s", bucket.count, self.service, key, exc)
                with self._lock:
                    for k, b in due[n:]:
                        self._buckets.setdefault(k, b)
                break
        return written

    def pending(self) -> int:
        """Denials counted and not yet written (those after the first of their bucket)."""
        with self._lock:
            return sum(b.count for b in self._buckets.values())

    def flush_all(self) -> int:
        return self.flush(everything=True)

    def _write_aggregate(self, bucket: _Bucket) -> None:
        d = bucket.denial
        if bucket.overflow:
            details = {"service": self.service, "source": OVERFLOW, "count": bucket.count,
                       "sources": len(bucket.sources), "paths": bucket.paths, "minute": bucket.minute,
                       "first_ts": bucket.first_ts, "last_ts": bucket.last_ts, "aggregated": True}
            self.audit.append(DENIAL_TYPE, user=UNAUTHENTICATED, role=None, outcome="denied",
                              summary=f"{self.service}: {bucket.count} denials from {len(bucket.sources)} sources "
                                      f"beyond {self.max_buckets} per minute ({bucket.minute})",
                              details=details)
            return
        details = {**self.details(d), "count": bucket.count, "paths": bucket.paths, "minute": bucket.minute,
                   "first_ts": bucket.first_ts, "last_ts": bucket.last_ts, "first_seq": bucket.first_seq,
                   "aggregated": True}
        details.pop("path")
        self.audit.append(DENIAL_TYPE, user=d.user or UNAUTHENTICATED, role=d.role, outcome="denied",
                          summary=f"{self.service}: {bucket.count} more {d.status} {d.code} from {d.source} "
                                  f"({bucket.minute})",
                          details=details)

    # ---- the background flush ---------------------------------------------------
    def _start_thread(self) -> None:
        if self.flush_seconds is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, name=f"denials-{self.service}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:   # never let the thread die: the next round retries
                log.exception("flushing denials of %s failed", self.service)

    def close(self) -> None:
        self._stop.set()
        self.flush_all()


@atexit.register
def _flush_at_exit() -> None:
    for denial_log in list(_logs):
        path = getattr(denial_log.audit, "path", None)
        if path is not None and not Path(path).parent.exists():
            continue   # its instance is gone (a test's temporary home): nothing can be written
        try:
            denial_log.flush_all()
        except Exception:
            pass
