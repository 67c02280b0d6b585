"""End to end with a real JupyterHub: reports published with ``sekisho reports publish``,
a manager logs in through the hub's login form in Debian chromium and reads them through
the reports service (hub OAuth), with the network off; the report cannot use the hub's
cookies or API; the manager cannot reach the guard.
"""

from __future__ import annotations

from urllib.parse import quote, urlparse

import pytest
import requests

from hub_fixtures import run_sekisho
from sekisho.access import ROLES, capabilities, load_policy_cached
from sekisho.services.reports import REPORT_CSP

pytestmark = [pytest.mark.hub, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-gpu",
        "--no-first-run"]


@pytest.fixture(scope="module")
def published_hub(hub):
    if not hub.populated:
        pytest.skip("the hub's instance has no data (synth/ingest not installed)")
    run_sekisho("reports", "publish", "01", "07", home=hub.home, timeout=900)
    return hub


@pytest.fixture(scope="module")
def manager_page(published_hub):
    playwright = pytest.importorskip("playwright.sync_api")
    manager = published_hub.users["manager"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1300, "height": 900}, locale="ja-JP")
        outside: list[str] = []

        def only_loopback(route):
            if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_loopback)
        page = context.new_page()
        page.goto(published_hub.url + "hub/login")
        page.fill("input[name=username]", manager.name)
        page.fill("input[name=password]", manager.password)
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_load_state("load")
        page.outside_requests = outside
        yield page
        context.close()
        browser.close()


def test_manager_reads_reports_through_the_hub_offline(published_hub, manager_page):
    page = manager_page
    page.goto(published_hub.url + "services/reports/")  # through the hub's OAuth
    page.wait_for_selector("text=公開レポート一覧", timeout=60_000)
    assert page.locator("table tbody tr").count() == 2
    page.screenshot(path="/tmp/sekisho-hub-reports-index.png", full_page=True)

    response = page.goto(published_hub.url + f"services/reports/r/{quote('01_人口')}/")
    assert response.headers["content-security-policy"] == REPORT_CSP
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    assert page.locator(".js-plotly-plot").count() >= 5
    page.screenshot(path="/tmp/sekisho-hub-report-population.png", full_page=False)

    # inside the sandboxed report: no cookies, no hub API
    assert page.evaluate("() => window.origin") == "null"
    cookie = page.evaluate("() => { try { return document.cookie } catch (e) { return 'blocked:' + e.name } }")
    assert cookie in ("", "blocked:SecurityError")
    outcome = page.evaluate("""async (url) => {
        try { const r = await fetch(url, {credentials: 'include'}); return 'status:' + r.status }
        catch (e) { return 'blocked' } }""", published_hub.url + "hub/api/user")
    assert outcome == "blocked"
    assert page.outside_requests == []

    views = [e for e in published_hub.instance.audit.entries(type="report.view")
             if e["type"] == "report.view" and e["outcome"] == "ok"]
    assert any(e["user"] == published_hub.users["manager"].name for e in views)


def test_manager_cannot_reach_the_guard(published_hub):
    manager = published_hub.users["manager"]
    session = published_hub.login(manager)
    token = published_hub.new_token(manager, session=session)
    r = requests.post(published_hub.url + "services/guard/api/query", timeout=30,
                      headers={"Authorization": f"token {token}"},
                      json={"sql": "SELECT block, COUNT(*) AS n FROM residents GROUP BY block"})
    assert r.status_code == 403


def test_who_else_reads_reports_follows_the_policy(published_hub):
    policy = load_policy_cached(published_hub.instance.policy_path)
    readers = {role for role in ROLES if capabilities(policy, role).can_read_reports}
    for role in ("analyst", "admin", "steward"):
        user = published_hub.users[role]
        session = published_hub.login(user)
        r = session.get(published_hub.url + "services/reports/", allow_redirects=True, timeout=60)
        if role in readers:
            assert r.status_code == 200 and "公開レポート一覧" in r.text
        else:
            assert r.status_code == 403 or "公開レポート一覧" not in r.text, role
