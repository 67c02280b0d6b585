"""A tiny city (2,000 persons): whole tables can be suppressed — the notebooks must still
publish, showing 秘匿 / データなし rather than failing (regression: 02_異動 raised
``KeyError: '年月'`` when every monthly cell was below k)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from reports_fixtures import EXTRACT, cli
from sekisho.instance import Instance
from sekisho.reports.periods import add_months, months_between
from sekisho.reports.render import NO_DATA, Report
from sekisho.state import set_role

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_city(tmp_path_factory):
    from sekisho.ingest import ingest
    from sekisho.reports.catalog import select
    from sekisho.reports.publish import publish

    root = tmp_path_factory.mktemp("tiny-city")
    cli("synth", "--out", str(root / "exports"), "--persons", "2000", "--seed", "11")
    instance = Instance.create(root / "home")
    set_role(instance, "stew", "steward")
    ingest(instance, root / "exports", user="stew", extract_date=EXTRACT)
    outcomes = publish(instance, select(["02", "06"]), caller="pytest", caller_role=None, workers=1)
    return instance, outcomes


def _table(instance, report: str, key: str) -> pd.DataFrame:
    index = json.loads((instance.published_dir / "index.json").read_text(encoding="utf-8"))
    entry = index["reports"][report]
    payload = json.loads((instance.published_dir / entry["dir"] / "tables" / f"{key}.json").read_text("utf-8"))
    return pd.DataFrame(payload["rows"], columns=payload["columns"], dtype=object)


def test_tiny_city_publishes_movements_and_households(tiny_city):
    _, outcomes = tiny_city
    assert [(o.name, o.ok, o.error) for o in outcomes] == [("02_異動", True, ""), ("06_世帯", True, "")]


def test_monthly_tables_keep_every_month_and_show_suppression(tiny_city):
    instance, _ = tiny_city
    t = _table(instance, "02_異動", "item13")
    base = EXTRACT.strftime("%Y-%m")
    assert list(t["年月"]) == months_between(add_months(base, -11), base)
    assert t["転出"].isna().sum() > 0, "a 2,000-person city should have suppressed monthly cells"
    t16 = _table(instance, "02_異動", "item16")
    assert len(t16) == 60


def test_an_empty_table_renders_as_no_data(tmp_path):
    report = Report(tables_dir=str(tmp_path), base_month="2026-10")
    report.table("empty", "空の表", pd.DataFrame({"区分": pd.Series(dtype=object)}))
    payload = json.loads((tmp_path / "empty.json").read_text(encoding="utf-8"))
    assert payload["rows"] == [] and payload["notes"][0] == NO_DATA
