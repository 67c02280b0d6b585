"""Reports and their CSV files use the answers' statuses (issue 19, item 6): X for 秘匿
with the legend, a sentence on the perturbation size (from the guard's summary), CSV
columns for status and accuracy, integers written as integers."""

from __future__ import annotations

import csv
import io
import json

import ibis
import numpy as np
import pandas as pd
import pytest

import sekisho.client  # noqa: F401
from sekisho.policy import load_instance_policy
from sekisho.reports import data
from sekisho.reports.render import PROTECTION_NOTE, Report, table_html, with_status_columns


@pytest.fixture
def reported(inst, monkeypatch):
    """The reports' data door connected to the guard in-process (as publishing does)."""
    monkeypatch.setenv("SEKISHO_HOME", str(inst.home))
    monkeypatch.setenv("SEKISHO_REPORTS_USER", "rep")
    data.connect.cache_clear()
    yield data
    data.connect().backend.disconnect()
    data.connect.cache_clear()


def test_a_report_table_shows_x_the_legend_and_the_perturbation_size(reported, inst, tmp_path):
    d = load_instance_policy(inst).disclosure.perturbation.max_noise
    df = reported.sql("SELECT age, COUNT(*) AS n FROM residents WHERE age >= 97 GROUP BY age ORDER BY age")
    assert df["age"].tolist() == [97, 98, 99, 100]                  # densified within the filter
    assert df.sekisho.status["n"].tolist()[3] == "suppressed_k"
    assert reported.perturbation()["max_noise"] == d
    r = Report(tables_dir=str(tmp_path), base_month="2026-10")
    r.table("item98", "98. 高齢者", df.rename(columns={"age": "年齢", "n": "人口"}))
    saved = json.loads((tmp_path / "item98.json").read_text(encoding="utf-8"))
    assert PROTECTION_NOTE in saved["notes"] and "「X」は秘匿" in PROTECTION_NOTE
    assert any(f"±{d} 以内" in n for n in saved["notes"])
    assert saved["status"]["人口"][3] == "suppressed_k"
    assert saved["rows"][3] == [100, None]                         # the JSON rows are unchanged in shape
    text = (tmp_path / "item98.csv").read_bytes().decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["年齢", "人口", "人口_status", "人口_accuracy"]
    for row, value in zip(rows[1:], df["n"]):
        if pd.isna(value):
            assert row[1:] == ["", "suppressed_k", ""]
        else:
            assert row[1:] == [str(int(value)), "released", str(d)]     # integers as integers


def test_x_in_html_and_integers_in_csv_without_a_guard():
    df = pd.DataFrame({"区分": ["男", "女", "計"], "人口": [1234.0, np.nan, 5678.0], "率": [1.5, np.nan, 2.25]})
    html = table_html(df)
    assert html.count('title="秘匿">X</td>') == 2 and "1,234" in html
    out, status = with_status_columns(df, {"method": "cell-key", "max_noise": 7})
    assert str(out["人口"].dtype) == "Int64" and out["人口"].tolist()[0] == 1234
    assert out["人口_accuracy"].tolist()[0] == 7 and pd.isna(out["人口_accuracy"].tolist()[1])
    assert pd.isna(out["率_accuracy"].tolist()[0])                   # not whole numbers: no count bound
    assert status == {"人口": ["released", "suppressed_k", "released"], "率": ["released", "suppressed_k", "released"]}
    assert "区分_status" not in out.columns                          # the label column is not a figure
    assert ibis  # the reports reach data only through the ibis backend (imported by data)


def test_a_report_csv_keeps_the_guards_own_status_where_rows_still_match(reported, tmp_path):
    # a sum withheld for dominance is said to be so in the CSV (not "suppressed_k"), and an
    # aggregate over partly suppressed cells is "partial", with no accuracy stated
    df = reported.sql("SELECT block, SUM(income_levy) AS s FROM resident_tax WHERE tax_year = 2025 GROUP BY block")
    r = Report(tables_dir=str(tmp_path), base_month="2026-10")
    r.table("item97", "97. 所得割額", df)
    saved = json.loads((tmp_path / "item97.json").read_text(encoding="utf-8"))
    by_block = dict(zip(df["block"], saved["status"]["s"]))
    assert by_block["安富"] == "suppressed_dominance"
    assert {v for b, v in by_block.items() if b != "安富"} == {"released"}
    partial = reported.sql("SELECT block, SUM(n) AS total FROM (SELECT block, sex, COUNT(*) AS n FROM residents "
                           "WHERE age >= 85 GROUP BY block, sex) AS t GROUP BY block")
    out, status = with_status_columns(partial, {"method": "cell-key", "max_noise": 5})
    assert "partial" in status["total"]
    assert all(pd.isna(a) for a, s in zip(out["total_accuracy"], status["total"]) if s == "partial")
    # a column the answer did not have (renamed in pandas): missing is suppressed_k, present released
    _, renamed = with_status_columns(df.rename(columns={"s": "所得割額"}), None)
    assert dict(zip(df["block"], renamed["所得割額"]))["安富"] == "suppressed_k"
