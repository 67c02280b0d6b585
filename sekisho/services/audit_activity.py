"""What the audit review pages compute from the trail: one activity record per person
(sessions with their duration, servers, queries, refusals, denied requests, alerts, ε
spent, views read, reports viewed), the alerts no reviewer has acknowledged yet, and the
query requests with no outcome on record.

Pure folds over audit entries, apart from the tornado handlers
(``sekisho.services.audit_review``), so they are tested on plain entries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sekisho.audit import DENIAL_TYPE, LOGIN_SERVICE

@dataclass
class Session:
    start: datetime
    end: datetime | None = None
    end_type: str | None = None   # logout / a later login / server.stop

    @property
    def duration(self) -> timedelta | None:
        return self.end - self.start if self.end else None


@dataclass
class PersonActivity:
    user: str
    role: str | None = None
    logins: list[Session] = field(default_factory=list)
    servers: list[Session] = field(default_factory=list)
    failed_logins: int = 0
    queries: int = 0
    refusals: int = 0
    alerts: int = 0
    denials: int = 0              # requests answered 401/403 (aggregated entries count each)
    epsilon_spent: float = 0.0
    views: Counter = field(default_factory=Counter)
    reports: Counter = field(default_factory=Counter)   # report views, per report
    last_seen: datetime | None = None

    @property
    def session_time(self) -> timedelta:
        return sum((s.duration for s in self.logins if s.duration), timedelta())


def person_activity(entries: Iterable[dict[str, Any]]) -> list[PersonActivity]:
    """Fold audit entries into one activity record per person (people first by name)."""
    people: dict[str, PersonActivity] = {}

    def person(name: str) -> PersonActivity:
        if name not in people:
            people[name] = PersonActivity(user=name)
        return people[name]

    for e in entries:
        name, kind = e.get("user") or "-", e["type"]
        ts = datetime.fromisoformat(e["ts"])
        details = e.get("details") or {}
        p = person(name)
        if e.get("role"):
            p.role = e["role"]
        p.last_seen = ts
        if kind == "login" and e["outcome"] == "ok":
            if p.logins and p.logins[-1].end is None:
                p.logins[-1].end, p.logins[-1].end_type = ts, "login"
            p.logins.append(Session(start=ts))
        elif kind == "logout":
            if p.logins and p.logins[-1].end is None:
                p.logins[-1].end, p.logins[-1].end_type = ts, "logout"
        elif kind == "login.failed":
            p.failed_logins += 1
        elif kind == DENIAL_TYPE and details.get("service") == LOGIN_SERVICE and details.get("aggregated"):
            # the rest of a minute's failed logins for one name typed, counted in one entry
            person(str(details.get("claimed") or name)).failed_logins += int(details.get("count") or 1)
            continue
        elif kind == "server.start" and e["outcome"] == "ok":
            p.servers.append(Session(start=ts))
        elif kind == "server.stop":
            if p.servers and p.servers[-1].end is None:
                p.servers[-1].end, p.servers[-1].end_type = ts, "server.stop"
        elif kind == "query":
            p.queries += 1
            p.epsilon_spent += float(details.get("epsilon_spent") or 0.0)
            p.views.update(details.get("views") or [])
        elif kind == "query.refused" and e["outcome"] != "denied":
            p.refusals += 1
        elif kind == "report.view" and e["outcome"] == "ok":
            p.reports[details.get("report") or "?"] += 1
        elif kind == "alert":
            p.alerts += 1
        if e["outcome"] == "denied" and kind not in ("login.failed", "server.start"):
            p.denials += int(details.get("count") or 1)
    return [people[k] for k in sorted(people)]


def unanswered_requests(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Query requests (``query.request``) with no outcome on record, oldest first.

    A request's outcome is the ``query`` entry that names it (``details.request``), or a
    later ``query.refused`` entry of the same person for the same SQL (a refusal while the
    query runs: time or memory limit, an error). What is left was never answered on record:
    the guard stopped (crash, power cut) while the request ran, or is still running it."""
    pending: dict[int, dict[str, Any]] = {}
    by_query: dict[tuple[Any, Any], list[int]] = {}
    for e in entries:
        kind, details = e["type"], e.get("details") or {}
        if kind == "query.request":
            pending[e["seq"]] = e
            by_query.setdefault((e.get("user"), details.get("sql")), []).append(e["seq"])
        elif kind == "query" and details.get("request") in pending:
            request = pending.pop(details["request"])
            waiting = by_query.get((request.get("user"), (request.get("details") or {}).get("sql")), [])
            if request["seq"] in waiting:
                waiting.remove(request["seq"])
        elif kind == "query.refused" and e["outcome"] == "refused":
            waiting = by_query.get((e.get("user"), details.get("sql")))
            if waiting:
                pending.pop(waiting.pop(0), None)
    return sorted(pending.values(), key=lambda e: e["seq"])


def open_alerts(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alerts (type ``alert``) that no ``alert.ack`` entry has answered yet, newest first."""
    alerts, acked = [], set()
    for e in entries:
        if e["type"] == "alert":
            alerts.append(e)
        elif e["type"] == "alert.ack":
            acked.add((e.get("details") or {}).get("alert_seq"))
    return [a for a in reversed(alerts) if a["seq"] not in acked]
