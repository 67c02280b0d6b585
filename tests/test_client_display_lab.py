"""In JupyterLab, on a REAL JupyterHub (tests/hub_fixtures.py), in Debian chromium: an
analyst opens a notebook in the Sekisho kernel; a refused query shows the Japanese
panel with a way forward and no traceback (folded away); a result shows 秘匿 as X under
the accuracy header (issue 19, "what must be shown"). Screenshots:
/tmp/sekisho-lab-refusal.png, /tmp/sekisho-lab-result.png.
"""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import requests

from sekisho.policy import load_instance_policy

pytestmark = [pytest.mark.hub, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-gpu", "--no-first-run"]
NOTEBOOK = "issue19-display.ipynb"
REFUSED = 'con.sql("SELECT * FROM residents WHERE age >= 65").execute()'
RESULT = ('t = con.table("residents")\n'
          'f = t.filter(t.age >= 97)\n'
          'f.group_by("age").agg(n=f.count()).order_by("age").execute()')


def _cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}


@pytest.fixture(scope="module")
def lab(hub):
    if not hub.populated:
        pytest.skip("the hub's instance has no data (synth/ingest not installed)")
    analyst = hub.users["analyst"]
    session = hub.login(analyst)
    hub.start_server(analyst, session)
    token = hub.new_token(analyst, session=session)
    notebook = {"nbformat": 4, "nbformat_minor": 5, "cells": [_cell(REFUSED), _cell(RESULT)],
                "metadata": {"kernelspec": {"name": "sekisho", "display_name": "Sekisho（安全な分析環境）",
                                            "language": "python"}}}
    r = requests.put(f"{hub.url}user/{analyst.name}/api/contents/{NOTEBOOK}",
                     json={"type": "notebook", "format": "json", "content": notebook},
                     headers={"Authorization": f"token {token}"}, timeout=60)
    assert r.status_code in (200, 201), (r.status_code, r.text[:300])
    return hub, analyst


@pytest.fixture(scope="module")
def page(lab):
    hub, analyst = lab
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="ja-JP")

        def only_loopback(route):
            if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", only_loopback)
        pg = context.new_page()
        pg.goto(hub.url + "hub/login")
        pg.fill("input[name=username]", analyst.name)
        pg.fill("input[name=password]", analyst.password)
        pg.click("input[type=submit], button[type=submit]")
        pg.wait_for_load_state("load")
        yield pg
        context.close()
        browser.close()


def test_refusal_panel_without_traceback_and_a_result_with_x_and_the_header(lab, page):
    hub, analyst = lab
    d = load_instance_policy(hub.instance).disclosure.perturbation.max_noise
    page.goto(f"{hub.url}user/{analyst.name}/lab/tree/{NOTEBOOK}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180_000)
    # the kernel is up when its status says idle; then run both cells
    page.wait_for_function("() => document.querySelectorAll('.jp-Notebook .jp-CodeCell').length >= 2",
                           timeout=60_000)
    page.wait_for_timeout(3000)
    page.locator(".jp-Notebook .jp-CodeCell").first.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    panel = page.locator(".sekisho-refusal")
    panel.wait_for(state="visible", timeout=180_000)
    assert "関所は照会を受け付けませんでした" in panel.inner_text()
    assert "代わりに" in panel.inner_text()
    # no traceback on screen: no error output, and the folded one is not visible
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert not page.get_by_text("Traceback (most recent call last)").first.is_visible()
    page.screenshot(path="/tmp/sekisho-lab-refusal.png", full_page=False)

    page.locator(".jp-Notebook .jp-CodeCell").nth(1).locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    result = page.locator(".sekisho-result")
    result.wait_for(state="visible", timeout=180_000)
    header = result.locator("table.sekisho-header").inner_text()
    assert "方式" in header and f"件数 ±{d} 以内" in header and "監査番号" in header
    x = result.locator("td.sekisho-x")
    assert x.count() >= 1 and x.first.inner_text() == "X" and x.first.is_visible()
    assert "X: 秘匿" in result.inner_text()
    page.screenshot(path="/tmp/sekisho-lab-result.png", full_page=False)
