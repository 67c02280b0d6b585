"""Discoverability (issue 19 item 4): ``con.describe()``, the greeting, ordered public
domains, and the report notebooks in every analyst's JupyterLab.

The describe tables and the ordering run against the real guard in-process (the views the
guard serves for the analyst's role under the real policy); the report folder is tested
as a unit and, with ``@pytest.mark.hub``, in a real analyst's server.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import ibis
import pandas as pd
import pytest
import requests

from client_fixtures import real_guard_instance, remove_instance
from sekisho.access import load_policy_cached
from sekisho.client.describe import (CLASS_LABELS_JA, UnknownView, column_domains, domain_summary,
                                     order_by_domains)
from sekisho.client.kernel import DISPLAY_NAME, KERNEL_NAME, greeting
from sekisho.hub import singleuser
from sekisho.hub.config import configure
from sekisho.resources import resource_dir

AGE_BAND_SQL = "SELECT age_band, COUNT(*) AS n FROM residents WHERE is_current GROUP BY age_band"


@pytest.fixture(scope="module")
def inst():
    instance = real_guard_instance()
    yield instance
    remove_instance(instance)


@pytest.fixture(scope="module")
def con(inst):
    return ibis.sekisho.connect(home=inst.home, user="ana")


@pytest.fixture(scope="module")
def policy(inst):
    return load_policy_cached(inst.policy_path)


# ---- con.describe() -------------------------------------------------------------------

def test_describe_lists_the_roles_views_in_japanese(con, policy):
    d = con.describe()
    assert d.headers == ["ビュー", "名称", "利用目的", "列数"]
    names = [row[0] for row in d.rows]
    assert names == sorted(con.list_tables()) and "residents" in names
    row = d.rows[names.index("residents")]
    assert row[1] == policy.views["residents"].title_ja
    assert int(row[3]) == len(policy.views["residents"].columns)
    text = str(d)
    assert "利用できるビュー" in text and 'con.describe("residents")' in text
    html = d._repr_html_()
    assert html.count("<tr>") == len(d.rows) + 1 and "住民" in html


def test_describe_a_view_shows_class_description_and_domain(con, policy):
    d = con.describe("residents")
    assert d.headers == ["列", "型", "分類", "説明", "値の範囲"]
    rows = {r[0]: r for r in d.rows}
    declared = policy.views["residents"].columns
    assert set(rows) == set(declared)
    for name, column in declared.items():
        assert rows[name][2] == CLASS_LABELS_JA[column.cls]
        assert rows[name][3] == column.description_ja
    band = list(declared["age_band"].domain)
    assert rows["age_band"][4].startswith("、".join(band[:4])) and f"{len(band)}区分" in rows["age_band"][4]
    assert rows["age"][4] == f"0〜100（{len(declared['age'].domain)}区分）"
    assert rows["person_id"][4] == "（値は出力できません）"
    assert "is_current" in str(d)                      # how to count today's residents
    frame = d.frame
    assert list(frame.columns) == d.headers and len(frame) == len(declared)


def test_describe_an_unknown_view_names_the_available_ones(con):
    with pytest.raises(UnknownView) as info:
        con.describe("taxpayers")
    assert "residents" in str(info.value) and "taxpayers" in str(info.value)


def test_domain_summary_forms():
    assert domain_summary({"domain": ["男", "女"]}) == "男、女"
    assert domain_summary({"domain": [True, False]}) == "true、false"
    assert domain_summary({"domain": list(range(1, 13))}) == "1〜12（12区分）"
    assert domain_summary({"bounds": [0, 500]}) == "0〜500（集計の上下限）"
    assert domain_summary({"class": "dimension"}) == "—"


# ---- the greeting ---------------------------------------------------------------------

def test_greeting_says_how_to_list_views_use_dp_and_count_current_residents(con, policy):
    text = greeting(con)
    dp = policy.disclosure.dp
    assert "con.describe()" in text
    assert 'mode="dp"' in text
    assert f"1回の ε は {dp.epsilon_per_query_min:g}〜{dp.epsilon_per_query_max:g}" in text
    assert f"/ {dp.budget_per_period:.2f}" in text
    assert "t.filter(t.is_current)" in text


def test_greeting_example_runs_as_the_where_is_current_query(con):
    t = con.table("residents")
    cur = t.filter(t.is_current)                        # the greeting's example, as written there
    current = cur.group_by("block").agg(n=cur.count()).execute()
    assert "is_current" in con.last_sql
    same = con.sql("SELECT block, COUNT(*) AS n FROM residents WHERE is_current GROUP BY block").execute()
    assert dict(zip(current["block"], current["n"])) == dict(zip(same["block"], same["n"]))


# ---- ordered public domains --------------------------------------------------------------

def test_age_bands_come_back_in_the_policys_order(con, policy):
    band = list(policy.views["residents"].columns["age_band"].domain)
    assert sorted(band) != band                          # as text they would sort otherwise
    t = con.table("residents")
    df = t.group_by("age_band").agg(n=t.count()).execute()
    assert isinstance(df["age_band"].dtype, pd.CategoricalDtype) and df["age_band"].cat.ordered
    assert list(df["age_band"].cat.categories) == band
    assert list(df["age_band"]) == [b for b in band if b in set(df["age_band"])]
    assert df.attrs.get("sekisho") is not None           # the summary travels with the reordered frame


def test_an_order_by_on_a_band_follows_the_domain_not_the_text(con, policy):
    band = list(policy.views["residents"].columns["age_band"].domain)
    asc = con.sql(AGE_BAND_SQL + " ORDER BY age_band").execute()
    desc = con.sql(AGE_BAND_SQL + " ORDER BY age_band DESC").execute()
    present = [b for b in band if b in set(asc["age_band"])]
    assert list(asc["age_band"]) == present and list(desc["age_band"]) == present[::-1]
    # the values stay with their rows: the same count per band either way
    assert dict(zip(asc["age_band"], asc["n"].fillna(-1))) == dict(zip(desc["age_band"], desc["n"].fillna(-1)))


def test_order_by_domains_never_loses_a_value_outside_the_domain():
    views = {"v": {"columns": {"band": {"domain": ["0-4", "5-9", "10-14"]}}}}
    df = pd.DataFrame({"band": ["10-14", "other", "0-4"], "n": [1, 2, 3]})
    out = order_by_domains(df, views, None)
    assert list(out["band"]) == ["10-14", "other", "0-4"]
    assert not isinstance(out["band"].dtype, pd.CategoricalDtype)


def test_views_that_disagree_on_a_domain_give_no_order():
    views = {"a": {"columns": {"k": {"domain": ["x", "y"]}}}, "b": {"columns": {"k": {"domain": ["y", "x"]}}}}
    assert column_domains(views) == {}
    df = pd.DataFrame({"k": ["y", "x"], "n": [1, 2]})
    assert list(order_by_domains(df, views, None)["k"]) == ["y", "x"]


def test_rows_keep_their_labels_when_reordered():
    views = {"v": {"columns": {"band": {"domain": ["0-4", "5-9", "10-14"]}}}}
    df = pd.DataFrame({"band": ["10-14", "0-4", "5-9"], "n": [30, 10, 20]})
    out = order_by_domains(df, views, "SELECT band, n FROM v")
    assert list(out.index) == [1, 2, 0] and list(out["n"]) == [10, 20, 30]


# ---- the report notebooks in JupyterLab ---------------------------------------------------

def test_report_notebooks_are_staged_read_only_with_the_sekisho_kernel(tmp_path):
    written = singleuser.stage_reports(tmp_path)
    folder = tmp_path / singleuser.REPORTS_FOLDER
    shipped = sorted(p.name for p in resource_dir("reports").glob("*.ipynb"))
    assert sorted(p.name for p in written if p.suffix == ".ipynb") == shipped
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o555
    for name in shipped:
        path = folder / name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        nb = json.loads(path.read_text(encoding="utf-8"))
        assert nb["metadata"]["kernelspec"] == {"name": KERNEL_NAME, "display_name": DISPLAY_NAME,
                                                "language": "python"}
    spec = json.loads((resource_dir("kernels") / KERNEL_NAME / "kernel.json").read_text(encoding="utf-8"))
    assert spec["display_name"] == DISPLAY_NAME
    # a second start refreshes the copies (an old one is replaced, not kept)
    os.chmod(folder, 0o755)
    os.chmod(folder / shipped[0], 0o644)
    (folder / shipped[0]).write_text("{}", encoding="utf-8")
    os.chmod(folder, 0o555)
    singleuser.stage_reports(tmp_path)
    assert json.loads((folder / shipped[0]).read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"] == KERNEL_NAME


def test_a_report_folder_that_is_a_symlink_is_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / singleuser.REPORTS_FOLDER).symlink_to(elsewhere)
    assert singleuser.stage_reports(home) == []
    assert list(elsewhere.iterdir()) == []


def test_servers_start_through_the_staging_program(tmp_path):
    from traitlets.config import Config

    from sekisho.instance import Instance

    instance = Instance.create(tmp_path / "home")
    c = Config()
    configure(c, instance.home)
    assert c.Spawner.cmd == [str(Path(sys.prefix) / "bin" / "python"), "-I", "-m", "sekisho.hub.singleuser"]
    assert singleuser.singleuser_command(["--debug"])[1:] == [str(Path(sys.executable).with_name("jupyterhub-singleuser")),
                                                             "--debug"]


@pytest.mark.hub
def test_an_analysts_lab_has_the_report_folder_opening_in_the_sekisho_kernel(hub):
    analyst = hub.users["analyst"]
    session = hub.login(analyst)
    hub.start_server(analyst, session)
    token = hub.new_token(analyst, session=session)
    base = hub.url + f"user/{analyst.name}/api/"
    headers = {"Authorization": f"token {token}"}
    folder = requests.get(base + "contents/" + singleuser.REPORTS_FOLDER, headers=headers, timeout=30)
    assert folder.status_code == 200, folder.text
    listing = {item["name"]: item for item in folder.json()["content"]}
    shipped = sorted(p.name for p in resource_dir("reports").glob("*.ipynb"))
    assert set(shipped) <= set(listing)
    assert not any(listing[name]["writable"] for name in shipped)      # JupyterLab opens them read-only
    nb = requests.get(base + "contents/" + singleuser.REPORTS_FOLDER + "/" + shipped[0], headers=headers, timeout=30)
    assert nb.json()["content"]["metadata"]["kernelspec"]["name"] == KERNEL_NAME
    kernelspecs = requests.get(base + "kernelspecs", headers=headers, timeout=30).json()
    assert KERNEL_NAME in kernelspecs["kernelspecs"] and kernelspecs["default"] == KERNEL_NAME
    save = requests.put(base + "contents/" + singleuser.REPORTS_FOLDER + "/" + shipped[0], headers=headers,
                        json={"type": "notebook", "format": "json", "content": nb.json()["content"]}, timeout=30)
    assert save.status_code >= 400                                   # a copy is saved elsewhere
