"""The reports service (JupyterHub managed service ``reports``, runs as the service account).

Pages, under ``/services/reports/``:

* ``""`` — the index: title, 基準年月, published at, data snapshot of each report;
* ``r/<name>/`` — a published report (self-contained HTML);
* ``r/<name>/tables/<key>.json|.csv`` — the report's tables as published;
* ``api/index`` — the index as JSON.

Who: a hub user whose token carries ``access:services!service=reports`` and
``custom:sekisho:reports-read`` (checked explicitly by :class:`ServiceHandler`) and whose
Sekisho role may read reports (``can_read_reports`` in the policy: managers, analysts,
admins). Every report view is audited (``report.view``); if the audit cannot be written
the report is not served. Every refusal (401/403) is audited too: the first of its source
and minute as ``report.view`` with outcome ``denied``, the others counted into one
``access.denied`` entry per minute (``sekisho.audit.denials``).

Published HTML is served with a Content-Security-Policy *sandbox* without
``allow-same-origin``: the page runs in an opaque origin, so its scripts (plotly) cannot
read the hub's cookies or call the hub's API with them; ``default-src 'none'`` and no
``connect-src`` forbid any network request at all.
"""

from __future__ import annotations

import logging
import os
from html import escape
from http import HTTPStatus
from urllib.parse import quote

from tornado import web
from tornado.httpserver import HTTPServer

from sekisho.access import REPORTS_SERVICE, SERVICES
from sekisho.audit import DenialLog
from sekisho.instance import Instance
from sekisho.reports.index import entries, read_index, report_file
from sekisho.reports.periods import label_ja
from sekisho.services.hubauth import ServiceHandler, make_app, serve

log = logging.getLogger("sekisho.services.reports")

#: for published report pages: scripts only inline (plotly), no network, opaque origin
REPORT_CSP = ("sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; "
              "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
#: for the service's own pages (the index): no scripts at all
INDEX_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
             "form-action 'none'; frame-ancestors 'self'")


class ReportsHandler(ServiceHandler):
    required_scopes = frozenset(SERVICES[REPORTS_SERVICE].oauth_scopes)
    required_capability = "can_read_reports"

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", INDEX_CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")

    # a refused view is a report.view entry (outcome denied), aggregated per source and
    # minute with every other 401/403 of the service (ServiceHandler.record_denial)
    denial_type = "report.view"

    @property
    def published_dir(self):
        return self.instance.published_dir


class IndexPage(ReportsHandler):
    def get(self) -> None:
        rows = []
        for e in entries(self.published_dir):
            rows.append(
                f'<tr><td><a href="r/{quote(e["name"])}/">{escape(e["title"])}</a></td>'
                f"<td>{escape(label_ja(e['base_month']))}</td>"
                f"<td>{escape(e['published_at'].replace('T', ' ')[:16])}</td>"
                f"<td><code>{escape(e['snapshot'])}</code></td></tr>")
        body = ("<table><thead><tr><th>レポート</th><th>基準年月</th><th>公開日時</th>"
                "<th>データ（スナップショット）</th></tr></thead><tbody>" + "".join(rows)
                + "</tbody></table>") if rows else "<p>公開済みのレポートはまだありません。</p>"
        self.finish(INDEX_PAGE.format(user=escape(self.hub_user), role=escape(self.sekisho_role),
                                      body=body))


class IndexApi(ReportsHandler):
    api = True

    def get(self) -> None:
        self.finish({"reports": entries(self.published_dir)})


class ReportPage(ReportsHandler):
    """One published report, or one of its tables."""

    TYPES = {".html": "text/html; charset=UTF-8", ".json": "application/json; charset=UTF-8",
             ".csv": "text/csv; charset=UTF-8"}

    def get(self, name: str, relative: str | None = None) -> None:
        relative = relative or "report.html"
        suffix = os.path.splitext(relative)[1]
        if suffix not in self.TYPES or (relative != "report.html" and not relative.startswith("tables/")):
            raise web.HTTPError(HTTPStatus.NOT_FOUND)
        path = report_file(self.published_dir, name, relative)
        if path is None:
            raise web.HTTPError(HTTPStatus.NOT_FOUND)
        entry = read_index(self.published_dir)["reports"][name]
        data = path.read_bytes()
        # audited before anything is sent; an audit failure means no report (fail closed)
        self.instance.audit.append(
            "report.view", user=self.hub_user, role=self.sekisho_role, outcome="ok",
            summary=f"viewed {name}/{relative}",
            details={"report": name, "file": relative, "publication": entry["dir"],
                     "digest": entry["digest"], "base_month": entry["base_month"]})
        self.set_header("Content-Type", self.TYPES[suffix])
        self.set_header("Content-Security-Policy", REPORT_CSP)
        if suffix != ".html":
            self.set_header("Content-Disposition",
                            f"attachment; filename*=UTF-8''{quote(name + '_' + os.path.basename(relative))}")
        self.finish(data)


INDEX_PAGE = """<!doctype html><html lang="ja"><head><meta charset="utf-8">
<title>公開レポート — 関所</title>
<style>
body {{ font-family: "Noto Sans CJK JP", sans-serif; margin: 0; background: #fafafa; color: #222; }}
header {{ background: #27415e; color: #fff; padding: 1em 2em; }}
header h1 {{ margin: 0; font-size: 1.5em; }} header p {{ margin: .3em 0 0 0; font-size: .9em; }}
main {{ padding: 1em 2em; }}
table {{ border-collapse: collapse; background: #fff; }}
th, td {{ border: 1px solid #ccc; padding: .4em .8em; text-align: left; }}
th {{ background: #e8eef5; }}
p.note {{ color: #555; font-size: .85em; }}
</style></head><body>
<header><h1>公開レポート一覧</h1><p>{user}（{role}）</p></header>
<main>{body}
<p class="note">掲載している数値はすべて関所のガードで秘匿・撹乱処理を行ったものです。
秘匿・撹乱処理のため合計が一致しない場合があります。</p>
<p><a href="/hub/home">ハブのホームへ戻る</a></p></main></body></html>"""


class ReportsService:
    """The instance and the tornado application of the reports service."""

    def __init__(self, instance: Instance, *, hub_auth=None, prefix: str = SERVICES[REPORTS_SERVICE].path,
                 service_name: str = REPORTS_SERVICE) -> None:
        self.instance = instance
        self.hub_auth = hub_auth
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.service_name = service_name
        self.denials = DenialLog(instance.audit, service_name)   # 401/403 on record, per source and minute

    def make_app(self) -> web.Application:
        # tornado matches the percent-encoded path; the name is then looked up in the index
        # (only published names resolve), so any segment may be tried safely
        name = r"([^/]+)"
        routes = [
            (r"", IndexPage),
            (r"api/index", IndexApi),
            (rf"r/{name}/", ReportPage),
            (rf"r/{name}/(tables/[0-9A-Za-z_\-]+\.(?:json|csv))", ReportPage),
        ]
        return make_app(self.service_name, routes, instance=self.instance, prefix=self.prefix,
                        hub_auth=self.hub_auth, denials=self.denials)

    def listen(self, port: int, address: str = "127.0.0.1") -> HTTPServer:
        server = HTTPServer(self.make_app(), xheaders=True)
        server.listen(port, address)
        return server


def main() -> None:
    """Entry point of the managed service (``python -m sekisho.services.reports``)."""
    serve(REPORTS_SERVICE, lambda instance, env, address, port: ReportsService(
        instance, prefix=env["prefix"], service_name=env["name"]).listen(port, address))


if __name__ == "__main__":
    main()
