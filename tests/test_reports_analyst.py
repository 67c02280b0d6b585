"""An analyst runs a report notebook in their own kernel, through the guard *service*
(``ibis.sekisho.connect()`` with their hub token), and gets the published figures.
A manager reaches neither the guard nor the publishing.

The guard service is the real one (real guard, real HubOAuth) on loopback, in front of a
stand-in for the hub's ``/hub/api/user``; the end-to-end hub tests use a real hub.
"""

from __future__ import annotations

import json

import papermill as pm
import pytest
import requests
from click.testing import CliRunner

from client_fixtures import GUARD_SCOPE, HubApiDouble, ServiceThread, hub_oauth
from sekisho.reports.catalog import select
from sekisho.services.guard import GuardService
from sekisho.state import set_role

pytestmark = pytest.mark.slow


def guard_without_condition_influence(instance):
    """The real guard with the policy's condition-influence rule off. The report notebooks
    run as the ``reports`` role, which the policy exempts (fixed, reviewed queries); in
    this 4,000-person city many of their conditions change fewer than k persons, so an
    analyst with the rule on gets them left out (or the household-type query refused) —
    tested in test_guard_attacks / test_guard_units and in
    ``test_analyst_with_the_rule_is_told_what_was_left_out`` below. Here the point is
    the path: kernel -> guard service -> the same protected figures."""
    import dataclasses

    from sekisho.guard import Guard
    from sekisho.policy import load_instance_policy

    policy = load_instance_policy(instance)
    policy = dataclasses.replace(policy, disclosure=dataclasses.replace(policy.disclosure,
                                                                        condition_influence=False))
    return Guard(instance, policy=policy)


def test_analyst_with_the_rule_is_told_what_was_left_out(published_city):
    """With the rule on (the real policy), the analyst's households-by-size query at the
    latest month: "registered by then" holds for everyone, so it changes nobody and is
    left out — named in the notes — and the figures are those of the reports role."""
    from sekisho.guard import Guard
    from sekisho.reports.sql import households_at

    set_role(published_city.instance, "suzuki", "analyst")
    guard = Guard(published_city.instance)
    month = published_city.extract.strftime("%Y-%m")
    sql = f"SELECT members, COUNT(*) AS n FROM {households_at(month)} AS h GROUP BY members ORDER BY members"
    try:
        mine = guard.query(sql, user="suzuki")
        reports = guard.query(sql, user="reports")
    finally:
        guard.close()
    assert any(f"registered_ym\" <= '{month}'" in c for c in mine.summary["conditions_left_out"])
    assert any("適用していません" in n for n in mine.summary["notes_ja"])
    assert reports.summary["conditions_left_out"] == []
    assert mine.table.to_pylist() == reports.table.to_pylist()


@pytest.fixture(scope="module")
def guard_service(published_city):
    instance = published_city.instance
    set_role(instance, "tanaka", "analyst")
    set_role(instance, "sato", "manager")
    hub = HubApiDouble().start()
    hub.add_token("tok-analyst-tanaka", "tanaka", [GUARD_SCOPE])
    hub.add_token("tok-manager-sato", "sato", [GUARD_SCOPE, "access:services!service=reports"])
    service = GuardService(instance, hub_auth=hub_oauth(hub.api_url), workers=2,
                           guard_factory=guard_without_condition_influence)
    thread = ServiceThread(service).start()
    yield thread
    thread.stop()
    service.pool.shutdown()
    hub.stop()


@pytest.mark.parametrize("name", ["07_教育保育", "06_世帯"])
def test_analyst_kernel_gets_the_published_figures(published_city, guard_service, tmp_path,
                                                   monkeypatch, name):
    # the analyst's kernel environment: a hub token and the guard's URL, no instance access
    for key in ("SEKISHO_HOME", "SEKISHO_REPORTS_USER", "SEKISHO_REPORTS_PUBLISH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SEKISHO_GUARD_URL", guard_service.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-analyst-tanaka")
    entry = published_city.index()["reports"][name]
    notebook = select([name])[0]
    tables = tmp_path / "tables"
    pm.execute_notebook(str(notebook.path), str(tmp_path / "run.ipynb"), kernel_name="python3",
                        parameters={**entry["parameters"], "tables_dir": str(tables)},
                        progress_bar=False, cwd=str(tmp_path))
    assert sorted(p.stem for p in tables.glob("*.json")) == sorted(entry["tables"])
    for key in entry["tables"]:
        mine = json.loads((tables / f"{key}.json").read_text(encoding="utf-8"))
        published = json.loads((published_city.instance.published_dir / entry["dir"] / "tables"
                                / f"{key}.json").read_text(encoding="utf-8"))
        assert mine["rows"] == published["rows"], key
    # and those queries were the analyst's, audited as such
    users = {e["user"] for e in published_city.instance.audit.entries(type="query")
             if e["type"] == "query"}
    assert "tanaka" in users


def test_manager_cannot_query_the_guard_service(guard_service):
    r = requests.post(guard_service.url + "api/query", timeout=30,
                      headers={"Authorization": "token tok-manager-sato"},
                      json={"sql": "SELECT block, COUNT(*) AS n FROM residents GROUP BY block"})
    assert r.status_code == 403
    assert "block" not in r.text or "n" not in r.json().get("columns", [])


def test_manager_cannot_publish(published_city, monkeypatch):
    from sekisho.cli.reports import publish

    monkeypatch.setattr("sekisho.cli.reports.resolve_caller", lambda as_user: ("sato", None))
    result = CliRunner().invoke(publish, ["--home", str(published_city.instance.home), "07"])
    assert result.exit_code != 0 and "may not publish" in result.output
