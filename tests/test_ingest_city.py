"""The shared synthetic city, ingested end to end: the whole store is scanned for every
raw identifier, name, kana, address and exact birth date of the export, and none is found."""

from __future__ import annotations

import csv
import re

from sekisho.policy import load_policy
from sekisho.store import Store

from ingest_fixtures import scan_store


def _raw(city, name):
    with open(city.source_dir / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_city_is_ingested_with_every_view(ingested_instance):
    city = ingested_instance
    pol = load_policy(city.instance.policy_path)
    info = Store(city.instance).current()
    assert set(info.tables) == set(pol.views)
    assert info.tables["residents"] == city.manifest["files"]["residents.csv"]["rows"]
    assert info.tables["movements"] == city.manifest["files"]["movements.csv"]["rows"]
    assert city.result.extract_date == city.manifest["extract_date"]
    current = Store(city.instance).connect().table("residents").filter(lambda t: t.is_current)
    assert current.count().execute() == city.manifest["residents_current"]


def test_no_raw_value_of_the_export_is_anywhere_in_the_store(ingested_instance):
    city = ingested_instance
    needles: set[str] = set()
    for r in _raw(city, "residents.csv"):
        needles |= {r["name"], r["name_kana"], r["banchi"], r["address"], r["birth_date"],
                    r["atena_no"], r["setai_no"]}
    for r in _raw(city, "movements.csv"):
        needles |= {r["atena_no"], r["setai_no"], r["idou_date"], r["idou_id"]}
    # the extract date is public (the snapshot's meta records it), not a person's date
    needles = {n for n in needles if n} - {city.manifest["extract_date"]}
    # sanity: the scan does find values that are meant to be there
    assert scan_store(city.instance, {"飾磨", "2820140001"}) == {"飾磨", "2820140001"}
    found = scan_store(city.instance, needles)
    assert not found, f"{len(found)} raw values found in the store, e.g. {sorted(found)[:3]}"


def test_ages_are_top_coded_and_dates_are_months(ingested_instance):
    con = Store(ingested_instance.instance).connect()
    res = con.table("residents").to_pandas()
    assert res.age.between(0, 100).all()
    assert res.birth_ym.map(lambda s: bool(re.fullmatch(r"\d{4}-\d{2}", s))).all()
    old = res[res.age == 100]
    if len(old):
        assert old.birth_ym.nunique() == 1 and old.birth_year.nunique() == 1
