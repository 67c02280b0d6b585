"""The audit review pages in a real browser (Debian chromium through Playwright).

An analyst logs in through the hub's login form and gets 403 from the audit pages; the
analyst queries the guard from their server's token; an admin logs in and finds the
analyst's login and query in the Japanese pages. Screenshots go to /tmp for a look.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.hub, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-gpu",
                 "--no-first-run"]
SCREENSHOTS = Path("/tmp")
QUERY = "SELECT block, COUNT(*) AS n FROM residents GROUP BY block"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (scripts/install.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def browser_login(browser, hub, user):
    """Log in through the hub's own login form, as a person would."""
    context = browser.new_context(locale="ja-JP", viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(hub.url + "hub/login")
    page.fill("input[name=username]", user.name)
    page.fill("input[name=password]", user.password)
    with page.expect_navigation():
        page.click("input[type=submit], button[type=submit]")
    assert "/hub/login" not in page.url, f"login of {user.name} failed: {page.url}"
    return page


def test_analyst_gets_403_from_the_audit_pages(browser, hub):
    page = browser_login(browser, hub, hub.users["analyst"])
    for path in ("services/audit/", "services/audit/people", "services/audit/export.csv"):
        response = page.goto(hub.url + path)
        assert response.status == 403, (path, response.status, page.url)
        assert "イベント一覧" not in page.content()
    page.context.close()


def test_manager_gets_403_from_the_audit_pages_and_a_clear_page_on_spawn(browser, hub):
    context = browser.new_context(locale="ja-JP", viewport={"width": 1200, "height": 700})
    login_page = context.new_page()
    login_page.goto(hub.url + "hub/login")
    assert "ログイン・ログアウト・失敗したログインはすべて監査ログに記録されます" in login_page.inner_text("body")
    login_page.screenshot(path=str(SCREENSHOTS / "sekisho-hub-login.png"))
    context.close()

    page = browser_login(browser, hub, hub.users["manager"])
    assert page.goto(hub.url + "services/audit/").status == 403
    spawn = page.goto(hub.url + "hub/spawn")
    assert spawn.status == 403
    assert "この操作を行う権限がありません" in page.inner_text("body")
    page.screenshot(path=str(SCREENSHOTS / "sekisho-hub-manager-spawn-403.png"))
    page.context.close()


def test_admin_sees_the_analysts_login_and_query(browser, hub):
    analyst, admin = hub.users["analyst"], hub.users["admin"]
    # the analyst logs in (browser), starts a server and queries the guard with its token
    browser_login(browser, hub, analyst).context.close()
    hub.start_server(analyst)
    token = hub.server_token(analyst)
    answer = requests.post(hub.url + "services/guard/api/query", headers={"Authorization": f"token {token}"},
                           json={"sql": QUERY, "mode": "threshold", "format": "json"}, timeout=120)
    if hub.populated:
        assert answer.status_code == 200, answer.text[:500]

    page = browser_login(browser, hub, admin)
    assert page.url.rstrip("/").endswith("/services/audit"), page.url  # admins land on the review pages
    response = page.goto(hub.url + f"services/audit/?user={analyst.name}")
    assert response.status == 200
    rows = page.locator(f"tr.event[data-user='{analyst.name}']")
    types = rows.evaluate_all("rows => rows.map(r => r.dataset.type)")
    assert "login" in types
    assert "server.start" in types
    if hub.populated:
        assert "query" in types
    table_text = page.locator("#events").inner_text()
    assert QUERY in table_text, "the analyst's SQL is not shown"
    assert "ログイン" in table_text and "ハッシュチェーン検証: 正常" in page.content()
    page.screenshot(path=str(SCREENSHOTS / "sekisho-audit-review.png"), full_page=False)

    people = page.goto(hub.url + "services/audit/people")
    assert people.status == 200
    assert page.locator(f"tr.person[data-user='{analyst.name}']").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "sekisho-audit-people.png"), full_page=False)

    csv = page.request.get(hub.url + f"services/audit/export.csv?user={analyst.name}")
    assert csv.status == 200 and analyst.name in csv.text()
    page.context.close()

    reads = [e for e in hub.instance.audit.entries(user=admin.name, type="audit.read")]
    assert {e["details"]["page"] for e in reads} >= {"events", "people", "export"}


def test_a_cross_site_post_without_xsrf_cannot_acknowledge_alerts(browser, hub):
    admin = hub.users["admin"]
    alert = hub.instance.audit.append("alert", user=hub.users["analyst"].name, role="analyst", outcome="ok",
                                      summary="guard alert: test", details={"alert": "test"})
    page = browser_login(browser, hub, admin)
    page.goto(hub.url + "services/audit/")
    forged = page.request.post(hub.url + f"services/audit/alerts/{alert['seq']}/ack",
                               form={"note": "forged"}, max_redirects=0)
    assert forged.status == 403
    # the real form (with its xsrf token) works
    page.locator(f"form[action$='alerts/{alert['seq']}/ack'] button").click()
    page.wait_for_load_state()
    acks = [e for e in hub.instance.audit.entries(type="alert.ack") if e["details"]["alert_seq"] == alert["seq"]]
    assert [a["user"] for a in acks] == [admin.name]
    page.context.close()
