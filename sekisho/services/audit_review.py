"""The audit review service (hub managed service ``audit``): 監査ログの閲覧.

For people whose Sekisho role may review the audit trail (``can_review_audit`` in the
policy; "admins" — who are *not* hub admins). Pages, server-rendered in Japanese with
no external assets (LGWAN has no internet):

* ``/services/audit/``          events with filters (person, type, outcome, period), the
                                chain's verification status and its full head (``SEQ:HASH``,
                                for ``sekisho audit verify --expect-head``), open alerts,
                                analysts on hold (paused by an alert; lifted with
                                ``sekisho users resume``), query requests with no outcome
                                on record (flagged in the list too);
* ``/services/audit/people``    activity per person: sessions (login time, duration),
                                servers, queries, refusals, denied requests (401/403,
                                aggregated ones by their count), reports viewed, epsilon spent;
* ``/services/audit/export.csv`` the filtered events as CSV;
* ``POST /services/audit/alerts/<seq>/ack``  mark an alert as reviewed (``alert.ack``).

Access: HubOAuth; the token must hold ``access:services!service=audit`` *and* the custom
scope ``custom:sekisho:audit-review`` (checked explicitly), and the person's Sekisho
role must be allowed to review. Every read is itself audited (``audit.read``), refusals
too (``audit.read`` with outcome ``denied``).

This module is the tornado side (handlers, templates' helpers, routes); what the pages
select and compute lives in ``sekisho.services.audit_filters`` (the validated filters)
and ``sekisho.services.audit_activity`` (per-person activity, open alerts).

Run by the hub: ``python -m sekisho.services.audit_review``.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.access import AUDIT_SERVICE, ROLE_LABELS_JA, SERVICES, role_label
from sekisho.audit import AuditError, to_csv
from sekisho.guard import alerts as guard_alerts
from sekisho.instance import TOKYO, Instance
from sekisho.services.audit_activity import open_alerts, person_activity, unanswered_requests
from sekisho.services.audit_filters import OUTCOME_LABELS, FilterError, Filters, parse_filters, select
from sekisho.services.hubauth import ServiceHandler, make_app, serve

TEMPLATES = Path(__file__).parent / "templates" / "audit_review"

TYPE_LABELS = {
    "instance.init": "インスタンス作成",
    "ingest": "データ登録",
    "ingest.failed": "データ登録失敗",
    "query": "集計照会",
    "query.request": "照会受付",
    "query.refused": "照会拒否",
    "access.denied": "アクセス拒否（集約）",
    "alert": "警告",
    "alert.bookkeeping_failed": "警告判定の失敗",
    "alert.ack": "警告の確認",
    "guard.resume": "照会の再開",
    "login": "ログイン",
    "login.failed": "ログイン失敗",
    "logout": "ログアウト",
    "server.start": "サーバー起動",
    "server.stop": "サーバー停止",
    "audit.read": "監査ログ閲覧",
    "audit.recovered": "監査ログ修復",
    "publish": "レポート公表",
    "publish.failed": "レポート公表失敗",
    "report.view": "レポート閲覧",
    "users.add": "利用者追加",
    "users.remove": "利用者削除",
    "users.set-role": "ロール変更",
    "users.set-password": "パスワード再設定",
}
SESSION_END_LABELS = {"logout": "ログアウト", "login": "次のログイン", "server.stop": "サーバー停止"}


# ---- chain status (cached: verifying walks the whole log) -------------------------------

class ChainStatus:
    def __init__(self, instance: Instance):
        self.instance = instance
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._result = None

    def get(self):
        try:
            st = os.stat(self.instance.audit.path)
            key = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = (0, 0)
        with self._lock:
            if key != self._key:
                self._result = self.instance.audit.verify()
                self._key = key
            return self._result


# ---- formatting helpers for the templates --------------------------------------------------

def fmt_ts(value: str | datetime | None) -> str:
    if value is None:
        return "—"
    ts = datetime.fromisoformat(value) if isinstance(value, str) else value
    return ts.strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(value: timedelta | None) -> str:
    if value is None:
        return "継続中または不明"
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}時間{minutes}分"
    if minutes:
        return f"{minutes}分{secs}秒"
    return f"{secs}秒"


def details_text(details: dict[str, Any]) -> str:
    """A short one-line rendering of an entry's details (SQL first when present)."""
    if not details:
        return ""
    parts = []
    if "sql" in details:
        parts.append(str(details["sql"]))
    for key in ("stage", "mode", "decision", "service", "status", "code", "count", "path", "paths", "source",
                "minute", "reason", "epsilon_spent", "cells", "cells_suppressed", "report",
                "alert", "remote_ip", "name", "role", "previous", "filters", "note", "alert_seq"):
        if key in details and details[key] not in (None, "", {}):
            parts.append(f"{key}={details[key]}")
    text = " / ".join(parts)
    return text if len(text) <= 400 else text[:399] + "…"


# ---- handlers -----------------------------------------------------------------------------

class ReviewHandler(ServiceHandler):
    required_scopes = frozenset(SERVICES[AUDIT_SERVICE].oauth_scopes)
    required_capability = "can_review_audit"

    # a refusal is an audit.read entry (outcome denied), aggregated per source and minute
    # with every other 401/403 of the service (ServiceHandler.record_denial)
    denial_type = "audit.read"

    def filters(self) -> Filters:
        args = {k: self.get_argument(k, "") for k in ("user", "type", "outcome", "since", "until", "limit")}
        try:
            return parse_filters(args)
        except FilterError as exc:
            raise web.HTTPError(400, str(exc)) from None

    def record_read(self, what: str, filters: Filters, count: int, fmt: str = "html") -> None:
        """Reading is audited; if it cannot be, nothing is shown (fail closed)."""
        try:
            self.instance.audit.append("audit.read", user=self.hub_user, role=self.sekisho_role, outcome="ok",
                                       summary=f"{count} entries read via the audit review service ({what})",
                                       details={"filters": filters.as_dict(), "format": fmt, "page": what,
                                                "count": count, "remote_ip": self.request.remote_ip})
        except AuditError as exc:
            raise web.HTTPError(503, f"the audit trail cannot be written: {exc}") from None

    def render(self, template: str, **kwargs: Any) -> None:
        super().render(template, user=self.hub_user, role_label=role_label(self.sekisho_role),
                       prefix=self.settings["service_prefix"], type_labels=TYPE_LABELS,
                       outcome_labels=OUTCOME_LABELS, role_labels=ROLE_LABELS_JA, fmt_ts=fmt_ts,
                       fmt_duration=fmt_duration, details_text=details_text,
                       end_labels=SESSION_END_LABELS, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 400:
            exc = kwargs.get("exc_info", (None, None, None))[1]
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish("<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\"><title>入力エラー</title>"
                        "</head><body><h1>入力エラー</h1><p>検索条件が正しくありません: "
                        f"{escape(getattr(exc, 'log_message', '') or '')}</p>"
                        f"<p><a href=\"{escape(self.settings['service_prefix'])}\">戻る</a></p></body></html>")
            return
        super().write_error(status_code, **kwargs)


class IndexHandler(ReviewHandler):
    def get(self) -> None:
        filters = self.filters()
        entries = select(self.instance, filters)
        everything = list(self.instance.audit.entries())
        shown = list(reversed(entries))[:filters.limit]
        self.record_read("events", filters, len(shown))
        unanswered = unanswered_requests(everything)
        self.render("index.html", page="events", filters=filters, entries=shown, total=len(entries),
                    chain=self.settings["chain"].get(), alerts=open_alerts(everything),
                    unanswered=unanswered, unanswered_seqs={e["seq"] for e in unanswered},
                    holds=[dict(h, since=datetime.fromtimestamp(h["since"], TOKYO))
                           for h in guard_alerts.holds(self.instance)],
                    known_users=sorted({e.get("user") or "-" for e in everything}),
                    known_types=sorted({e["type"] for e in everything} | set(TYPE_LABELS)))


class PeopleHandler(ReviewHandler):
    def get(self) -> None:
        filters = self.filters()
        entries = select(self.instance, Filters(user=filters.user, since=filters.since, until=filters.until))
        people = person_activity(entries)
        self.record_read("people", filters, len(entries))
        self.render("people.html", page="people", filters=filters, people=people, chain=self.settings["chain"].get())


class ExportHandler(ReviewHandler):
    def get(self) -> None:
        filters = self.filters()
        entries = select(self.instance, filters)
        self.record_read("export", filters, len(entries), fmt="csv")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.set_header("Content-Type", "text/csv; charset=UTF-8")
        self.set_header("Content-Disposition", f'attachment; filename="sekisho-audit-{stamp}.csv"')
        self.finish("\ufeff" + to_csv(iter(entries)))  # BOM: Excel opens UTF-8 Japanese correctly


class AckHandler(ReviewHandler):
    def post(self, seq: str) -> None:
        alert_seq = int(seq)
        alert = next((e for e in self.instance.audit.entries(type="alert") if e["seq"] == alert_seq
                      and e["type"] == "alert"), None)
        if alert is None:
            raise web.HTTPError(404, f"no alert with seq {alert_seq}")
        note = self.get_argument("note", "").strip()[:500]
        try:
            self.instance.audit.append("alert.ack", user=self.hub_user, role=self.sekisho_role, outcome="ok",
                                       summary=f"alert {alert_seq} reviewed", details={
                                           "alert_seq": alert_seq, "alert_user": alert.get("user"),
                                           "note": note})
        except AuditError as exc:
            raise web.HTTPError(503, f"the audit trail cannot be written: {exc}") from None
        self.redirect(self.settings["service_prefix"] + "#alerts")


ROUTES = [
    ("", IndexHandler),
    ("people", PeopleHandler),
    ("export.csv", ExportHandler),
    (r"alerts/(\d+)/ack", AckHandler),
]


def app_settings(instance: Instance, prefix: str) -> dict[str, Any]:
    return {"template_path": str(TEMPLATES), "chain": ChainStatus(instance),
            "service_prefix": prefix if prefix.endswith("/") else prefix + "/"}


def main() -> None:
    """Entry point of the managed service (``python -m sekisho.services.audit_review``)."""
    def start(instance: Instance, env: dict[str, str], address: str, port: int) -> None:
        app = make_app(env["name"], ROUTES, instance=instance, prefix=env["prefix"],
                       **app_settings(instance, env["prefix"]))
        HTTPServer(app, xheaders=True).listen(port, address)

    serve(AUDIT_SERVICE, start)


if __name__ == "__main__":
    main()
