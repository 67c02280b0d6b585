"""A manager reads published reports in a real browser (Debian chromium via Playwright),
with the network off: only the loopback reports service is reachable.

The reports service runs with the real HubOAuth client against a stand-in for the hub's
``/hub/api/user``; the browser presents the manager's hub token on every request (as the
hub's OAuth cookie would). Screenshots go to /tmp/sekisho-report-*.png.
"""

from __future__ import annotations

from urllib.parse import quote, urlparse

import pytest

from client_fixtures import HubApiDouble, _LoopThread, hub_oauth
from sekisho.access import REPORTS_READ_SCOPE
from sekisho.services.reports import ReportsService
from sekisho.state import set_role

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-gpu",
        "--no-first-run"]


@pytest.fixture(scope="module")
def service(published_city):
    instance = published_city.instance
    set_role(instance, "kanri", "manager")
    hub = HubApiDouble().start()
    hub.add_token("tok-browser-manager", "kanri",
                  ["access:services!service=reports", REPORTS_READ_SCOPE])
    svc = ReportsService(instance, hub_auth=hub_oauth(hub.api_url))
    thread = _LoopThread(svc.make_app).start()
    thread.url = f"http://127.0.0.1:{thread.port}/services/reports/"
    yield thread
    thread.stop()
    hub.stop()


@pytest.fixture(scope="module")
def browser_page(service):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(
            extra_http_headers={"Authorization": "token tok-browser-manager"},
            viewport={"width": 1300, "height": 900}, locale="ja-JP")
        outside: list[str] = []

        def only_loopback(route):
            host = urlparse(route.request.url).hostname
            if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_loopback)
        # a cookie of the service's origin, standing in for the hub's session cookies
        context.add_cookies([{"name": "jupyterhub-session-id", "value": "secret-session",
                              "url": service.url}])
        page = context.new_page()
        page.outside_requests = outside
        yield page
        context.close()
        browser.close()


def test_manager_opens_index_and_a_report_with_maps_and_charts_offline(service, browser_page):
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    page.goto(service.url)
    assert "公開レポート一覧" in page.content()
    assert page.locator("table tbody tr").count() == 8
    page.screenshot(path="/tmp/sekisho-report-index.png", full_page=True)

    page.goto(service.url + f"r/{quote('01_人口')}/", wait_until="load")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() >= 5  # block bars, three mesh maps, pyramid
    # plotly drew every figure as SVG (and the heatmaps' cells as images inside it)
    drawn = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')]
        .map(p => p.querySelectorAll('svg.main-svg').length)""")
    assert all(n >= 1 for n in drawn), drawn
    assert page.locator("h2", has_text="3. 人口メッシュ地図 1km").count() == 1
    assert "秘匿・撹乱処理のため合計が一致しない場合があります" in page.content()
    page.screenshot(path="/tmp/sekisho-report-population.png", full_page=False)
    page.locator(".js-plotly-plot").nth(1).screenshot(path="/tmp/sekisho-report-mesh.png")
    page.locator(".js-plotly-plot").nth(3).screenshot(path="/tmp/sekisho-report-mesh250.png")
    assert page.outside_requests == []
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors


def test_report_page_cannot_read_cookies_or_call_the_hub(service, browser_page):
    page = browser_page
    page.goto(service.url + f"r/{quote('07_教育保育')}/", wait_until="load")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    assert page.evaluate("() => window.origin") == "null"  # sandboxed: an opaque origin
    cookie = page.evaluate("() => { try { return document.cookie } catch (e) { return 'blocked:' + e.name } }")
    assert cookie in ("", "blocked:SecurityError")
    hub_api = urlparse(service.url)._replace(path="/hub/api/user").geturl()
    for target in (hub_api, service.url + "api/index"):
        outcome = page.evaluate("""async (url) => {
            try { const r = await fetch(url, {credentials: 'include'}); return 'status:' + r.status }
            catch (e) { return 'blocked' } }""", target)
        assert outcome == "blocked", (target, outcome)
    # and the highlighted over-capacity rows and 定員なし reach the reader
    assert page.locator("h2", has_text="37. 教育・保育施設利用状況【概要】").count() == 1
    page.screenshot(path="/tmp/sekisho-report-childcare.png", full_page=False)
