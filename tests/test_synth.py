"""The synthetic source export (``sekisho synth``) and the public reference data.

A small city (a few thousand residents) is generated once per module; the tests read it
back as plain CSV and check the contract of docs/ARCHITECTURE.md section 2, referential
integrity, the agreement between the register and the 異動 history, and plausibility.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sekisho import reference as ref
from sekisho.synth import SynthError, generate
from sekisho.synth.names import all_name_strings

N = 4000
SEED = 11
EXTRACT = dt.date(2026, 10, 31)
WINDOW_START = dt.date(2021, 11, 1)

# The contract, spelled out independently of the implementation.
HEADERS = {
    "residents.csv": "atena_no,setai_no,name,name_kana,birth_date,sex,relationship,chome_code,"
                     "chome_name,gaiku,banchi,address,registered_date,removed_date,removal_reason",
    "address_master.csv": "chome_code,chome_name,block,gaiku,lat,lon",
    "movements.csv": "idou_id,atena_no,setai_no,idou_type,idou_date,notified_date,from_pref_code,"
                     "from_muni_code,from_muni_name,to_pref_code,to_muni_code,to_muni_name,"
                     "from_chome_code,from_gaiku,to_chome_code,to_gaiku",
    "childcare_facilities.csv": "facility_id,facility_name,facility_type,block,chome_code,"
                                "capacity_1,capacity_2,capacity_3",
    "childcare_certifications.csv": "cert_no,atena_no,cert_type,cert_date,valid_from,valid_to,"
                                    "facility_id,use_from,use_to",
    "resident_tax.csv": "atena_no,tax_year,taxable_income,income_levy,per_capita_levy",
}
DATE_COLUMNS = {
    "residents.csv": ["birth_date", "registered_date", "removed_date"],
    "movements.csv": ["idou_date", "notified_date"],
    "childcare_certifications.csv": ["cert_date", "valid_from", "valid_to", "use_from", "use_to"],
}


def _read(directory: Path, name: str, encoding: str = "utf-8") -> pd.DataFrame:
    df = pd.read_csv(directory / name, dtype=str, keep_default_na=False, na_values=[""],
                     encoding=encoding)
    for col in DATE_COLUMNS.get(name, []):
        df[col] = pd.to_datetime(df[col], format="%Y-%m-%d")
    return df


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth") / "export"
    manifest = generate(out, population=N, seed=SEED)
    data = {name: _read(out, name) for name in HEADERS}
    return {"dir": out, "manifest": manifest, **data}


@pytest.fixture(scope="module")
def residents(city) -> pd.DataFrame:
    return city["residents.csv"]


@pytest.fixture(scope="module")
def movements(city) -> pd.DataFrame:
    return city["movements.csv"]


@pytest.fixture(scope="module")
def current(residents) -> pd.DataFrame:
    return residents[residents.removed_date.isna()]


def _age(birth: pd.Series, on: dt.date) -> pd.Series:
    on = pd.Timestamp(on)
    before_birthday = (birth.dt.month * 100 + birth.dt.day) > (on.month * 100 + on.day)
    return on.year - birth.dt.year - before_birthday.astype(int)


# --- reference data -------------------------------------------------------------------

def test_reference_city_and_code_lists():
    assert (ref.CITY_CODE, ref.CITY_NAME, ref.PREF_CODE) == ("282014", "姫路市", "28")
    assert len(ref.PREFECTURES) == 47 and ref.PREFECTURES["28"] == "兵庫県" and ref.PREFECTURES["01"] == "北海道"
    assert ref.BLOCKS == ("安富", "家島", "広畑", "香寺", "飾磨", "西部", "中部第一", "中部第二",
                          "東部", "灘", "北部", "夢前", "網干")
    assert ref.IDOU_TYPES == ("転入", "転出", "転居", "出生", "死亡", "職権記載")
    assert ref.CERT_TYPES == ("1号", "2号", "3号")
    assert ref.SEX == {"1": "男", "2": "女"}


@pytest.mark.parametrize("code, name", [
    ("282014", "姫路市"), ("281000", "神戸市"), ("282031", "明石市"), ("282103", "加古川市"),
    ("271004", "大阪市"), ("261009", "京都市"), ("331007", "岡山市"), ("131008", "東京都特別区部"),
])
def test_known_municipality_codes(code, name):
    assert ref.is_valid_muni_code(code)
    if code != ref.CITY_CODE:
        assert ref.MUNICIPALITIES[code][1] == name


def test_every_municipality_code_has_a_valid_check_digit_and_prefecture():
    for code, (pref, name) in ref.MUNICIPALITIES.items():
        assert ref.is_valid_muni_code(code), (code, name)
        assert code[:2] == pref and pref in ref.PREFECTURES
    assert not ref.is_valid_muni_code("282015")  # wrong check digit
    assert ref.CITY_CODE not in ref.MUNICIPALITIES  # moves within the city are 転居, not 転入


def test_age_bands_scalar_vector_and_sql_agree():
    ages = list(range(0, 111)) + [0, 4, 5, 99, 100]
    scalar = [ref.age_band(a) for a in ages]
    assert scalar[0] == "0-4" and scalar[99] == "95-99" and scalar[100] == "100+" and scalar[110] == "100+"
    assert list(ref.age_bands(np.array(ages))) == scalar
    import pyarrow as pa
    with_null = ref.age_bands(pa.array([3, None, 101]))
    assert list(with_null) == ["0-4", None, "100+"]
    sql = ref.age_band_sql("age")
    got = duckdb.sql(f"SELECT {sql} AS b FROM unnest({ages}) t(age)").fetchall()
    assert [r[0] for r in got] == scalar
    assert duckdb.sql(f"SELECT {ref.age_band_sql('a')} FROM (SELECT NULL::INT AS a)").fetchone() == (None,)
    assert len(ref.AGE_BANDS) == 21 and set(scalar) == set(ref.AGE_BANDS)
    with pytest.raises(ValueError):
        ref.age_band(-1)


def test_names_are_cp932_and_readings_full_width_katakana():
    for text in all_name_strings():
        text.encode("cp932")
    kana = re.compile(r"^[ァ-ヶー]+$")
    from sekisho.synth.names import FAMILY_NAMES, GIVEN_NAMES
    readings = [r for _, r in FAMILY_NAMES] + [r for _, m, f in GIVEN_NAMES for _, r in m + f]
    assert all(kana.match(r) for r in readings)


# --- the contract ------------------------------------------------------------------------

def test_exact_headers_and_manifest(city):
    for name, header in HEADERS.items():
        with open(city["dir"] / name, encoding="utf-8") as f:
            assert f.readline().rstrip("\n") == header, name
    manifest = json.loads((city["dir"] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == SEED and manifest["population"] == N
    assert manifest["extract_date"] == "2026-10-31"
    assert manifest["window"] == ["2021-11-01", "2026-10-31"]
    for name in HEADERS:
        info = manifest["files"][name]
        data = (city["dir"] / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["rows"] == len(city[name])
    assert not [p for p in city["dir"].iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_code_formats(city, residents, movements):
    assert residents.atena_no.str.fullmatch(r"\d{10}").all()
    assert residents.setai_no.str.fullmatch(r"\d{10}").all()
    assert residents.chome_code.str.fullmatch(r"282014\d{4}").all()
    assert residents.sex.isin(["1", "2"]).all()
    assert residents.relationship.isin(ref.RELATIONSHIPS).all()
    assert residents.removal_reason.dropna().isin(["転出", "死亡"]).all()
    assert residents.name_kana.str.fullmatch(r"[ァ-ヶー]+ [ァ-ヶー]+").all()
    assert (residents.address == "兵庫県姫路市" + residents.chome_name + residents.banchi).all()
    assert (residents.banchi.str.extract(r"^(\d+)番\d+号$")[0] == residents.gaiku).all()
    assert movements.idou_type.isin(ref.IDOU_TYPES).all()
    for side in ("from", "to"):
        codes = movements[f"{side}_muni_code"].dropna()
        assert codes.map(ref.is_valid_muni_code).all()
        assert (codes.str[:2] == movements.loc[codes.index, f"{side}_pref_code"]).all()
    master = city["address_master.csv"]
    assert master.block.isin(ref.BLOCKS).all()
    lat, lon = master.lat.astype(float), master.lon.astype(float)
    assert lat.between(34.6, 35.1).all() and lon.between(134.45, 134.85).all()
    assert not master.duplicated(["chome_code", "gaiku"]).any()
    assert 850 <= master.chome_code.nunique() <= 950


# --- determinism -------------------------------------------------------------------------

def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", population=3000, seed=5)
    b = generate(tmp_path / "b", population=3000, seed=5)
    c = generate(tmp_path / "c", population=3000, seed=6)
    for name in list(HEADERS) + ["manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["files"] == b["files"]
    assert a["files"]["residents.csv"]["sha256"] != c["files"]["residents.csv"]["sha256"]
    assert a["files"]["movements.csv"]["sha256"] != c["files"]["movements.csv"]["sha256"]
    # the public address master is the same city whatever the seed
    assert a["files"]["address_master.csv"]["sha256"] == c["files"]["address_master.csv"]["sha256"]


# --- referential integrity -----------------------------------------------------------------

def test_referential_integrity(city, residents, movements):
    assert residents.atena_no.is_unique
    assert movements.idou_id.is_unique
    known = set(residents.atena_no)
    assert set(movements.atena_no) <= known
    assert set(city["childcare_certifications.csv"].atena_no) <= known
    assert set(city["resident_tax.csv"].atena_no) <= known
    master = set(zip(city["address_master.csv"].chome_code, city["address_master.csv"].gaiku))
    assert set(zip(residents.chome_code, residents.gaiku)) <= master
    for side in ("from", "to"):
        pairs = movements[[f"{side}_chome_code", f"{side}_gaiku"]].dropna()
        assert set(map(tuple, pairs.values)) <= master
    names = dict(zip(city["address_master.csv"].chome_code, city["address_master.csv"].chome_name))
    assert (residents.chome_code.map(names) == residents.chome_name).all()
    facilities = city["childcare_facilities.csv"]
    assert facilities.facility_id.is_unique
    assert set(city["childcare_certifications.csv"].facility_id.dropna()) <= set(facilities.facility_id)
    assert set(facilities.chome_code) <= set(names)
    # the household at each event is the person's household
    setai = dict(zip(residents.atena_no, residents.setai_no))
    assert (movements.atena_no.map(setai) == movements.setai_no).all()


# --- the register agrees with the movements ---------------------------------------------------

def test_register_dates_follow_the_events(residents, movements):
    start, end = pd.Timestamp(WINDOW_START), pd.Timestamp(EXTRACT)
    assert movements.idou_date.between(start, end).all()
    delay = (movements.notified_date - movements.idou_date).dt.days
    assert delay.between(0, 14).all() and (movements.notified_date <= end).all()

    people = residents.set_index("atena_no")
    entries = movements[movements.idou_type.isin(["転入", "出生", "職権記載"])]
    exits = movements[movements.idou_type.isin(["転出", "死亡"])]
    assert entries.atena_no.is_unique and exits.atena_no.is_unique
    # an entry in the window <=> registered on the event date (births: on the birth date)
    assert (people.loc[entries.atena_no, "registered_date"].values == entries.idou_date.values).all()
    births = entries[entries.idou_type == "出生"]
    assert (people.loc[births.atena_no, "birth_date"].values == births.idou_date.values).all()
    registered_in_window = people.index[people.registered_date >= start]
    assert set(registered_in_window) == set(entries.atena_no)
    # 転出 / 死亡 <=> removed on that date with that reason
    assert (people.loc[exits.atena_no, "removed_date"].values == exits.idou_date.values).all()
    assert (people.loc[exits.atena_no, "removal_reason"].values == exits.idou_type.values).all()
    assert set(people.index[people.removed_date.notna()]) == set(exits.atena_no)
    assert (people.removed_date.dropna() >= start).all()
    assert (people.registered_date >= people.birth_date).all()
    assert (people.removed_date.dropna() > people.registered_date[people.removed_date.notna()]).all()
    assert (people.registered_date <= end).all()


def test_address_history_is_a_chain_ending_at_the_register(residents, movements):
    """Each event leaves from where the previous one arrived; the last arrival (or the
    address left by an exit) is the address in the register."""
    order = {"転入": 0, "出生": 0, "職権記載": 0, "転居": 1, "転出": 2, "死亡": 2}
    events = movements.assign(rank=movements.idou_type.map(order)).sort_values(
        ["atena_no", "idou_date", "rank"])
    people = residents.set_index("atena_no")
    checked_moves = 0
    for atena, group in events.groupby("atena_no", sort=False):
        where = None
        for row in group.itertuples():
            if pd.notna(row.from_chome_code):
                if where is not None:
                    assert (row.from_chome_code, row.from_gaiku) == where, atena
                checked_moves += 1
            if pd.notna(row.to_chome_code):
                where = (row.to_chome_code, row.to_gaiku)
            elif row.idou_type in ("転出", "死亡"):
                where = (row.from_chome_code, row.from_gaiku)
        person = people.loc[atena]
        assert where == (person.chome_code, person.gaiku), atena
    assert checked_moves > 100
    moves = movements[movements.idou_type == "転居"]
    assert (moves.from_chome_code.notna() & moves.to_chome_code.notna()).all()
    assert ((moves.from_chome_code != moves.to_chome_code) | (moves.from_gaiku != moves.to_gaiku)).mean() > 0.9


def test_event_columns_follow_the_event_type(movements):
    by = {t: movements[movements.idou_type == t] for t in ref.IDOU_TYPES}
    assert by["転入"][["from_pref_code", "from_muni_code", "from_muni_name", "to_chome_code"]].notna().all().all()
    assert by["転入"][["to_pref_code", "from_chome_code"]].isna().all().all()
    assert by["転出"][["to_pref_code", "to_muni_code", "to_muni_name", "from_chome_code"]].notna().all().all()
    assert by["転出"][["from_pref_code", "to_chome_code"]].isna().all().all()
    for t in ("転居",):
        assert by[t][["from_chome_code", "to_chome_code"]].notna().all().all()
    assert by["出生"].to_chome_code.notna().all() and by["出生"].from_chome_code.isna().all()
    assert by["死亡"].from_chome_code.notna().all() and by["死亡"].to_chome_code.isna().all()
    for t in ("転居", "出生", "死亡", "職権記載"):
        assert by[t][["from_muni_code", "to_muni_code"]].isna().all().all(), t
    # in-migration mostly from 兵庫県, but not only
    pref = by["転入"].from_pref_code.value_counts(normalize=True)
    assert pref.idxmax() == "28" and 0.5 < pref["28"] < 0.85


# --- plausibility ----------------------------------------------------------------------------

def test_households_and_age_pyramid_are_plausible(current):
    households = current.groupby("setai_no").size()
    assert 2.15 <= len(current) / len(households) <= 2.55
    assert len(current) == N
    single = (households == 1).mean()
    assert 0.28 <= single <= 0.45
    # every household has exactly one head among its current members
    heads = current[current.relationship == "世帯主"].groupby("setai_no").size()
    assert heads.reindex(households.index).eq(1).all()

    age = _age(current.birth_date, EXTRACT)
    assert 0.24 <= (age >= 65).mean() <= 0.33
    assert 0.09 <= (age < 15).mean() <= 0.15
    assert (age >= 95).any() and age.max() <= 106
    men, women = current.sex == "1", current.sex == "2"
    assert 0.88 <= men.sum() / women.sum() <= 1.0
    assert ((age >= 80) & women).sum() > 1.3 * ((age >= 80) & men).sum()
    # wider at 40-54 than at 0-14 per year of age: an ageing pyramid
    assert (age.between(40, 54)).mean() / 15 > (age < 15).mean() / 15


def test_event_rates_per_thousand_are_plausible(current, movements):
    years = 5
    per_1000 = movements.idou_type.value_counts() / years / (len(current) / 1000)
    # Himeji per 1,000 a year: 転入 ~28, 転出 ~29, 転居 ~38, 出生 ~7.5, 死亡 ~10.4
    assert 18 <= per_1000["転入"] <= 40
    assert 18 <= per_1000["転出"] <= 40
    assert 25 <= per_1000["転居"] <= 55
    assert 4.5 <= per_1000["出生"] <= 11
    assert 7 <= per_1000["死亡"] <= 15
    assert per_1000.get("職権記載", 0) < 1
    counts = movements.idou_type.value_counts()
    assert counts["死亡"] > counts["出生"]                  # natural decrease
    assert abs(counts["転入"] - counts["転出"]) < 0.25 * counts["転入"]


def test_all_blocks_present_with_plausible_sizes(city, current):
    blocks = dict(zip(city["address_master.csv"].chome_code, city["address_master.csv"].block))
    share = current.chome_code.map(blocks).value_counts(normalize=True)
    assert set(share.index) == set(ref.BLOCKS)
    assert share["家島"] < 0.03 and share["安富"] < 0.03
    assert min(share[b] for b in ("中部第一", "中部第二", "飾磨")) > 0.07


def test_relationships_match_household_composition(current):
    by_household = current.groupby("setai_no").relationship.agg(set)
    assert by_household.map(lambda s: "妻" in s or "夫" in s).mean() > 0.4
    grandchildren = by_household[by_household.map(lambda s: "孫" in s)]
    assert len(grandchildren) > 0 and grandchildren.map(lambda s: "世帯主" in s).all()
    assert len(set(current.relationship)) >= 10


# --- childcare -------------------------------------------------------------------------------

def test_childcare_facilities(city):
    f = city["childcare_facilities.csv"]
    assert set(f.facility_type) == set(ref.FACILITY_TYPES)
    cap = f[["capacity_1", "capacity_2", "capacity_3"]].astype(int)
    assert (cap >= 0).all().all()
    kinder = f.facility_type == "公立幼稚園"
    assert (cap.loc[kinder, ["capacity_2", "capacity_3"]] == 0).all().all()
    nursery = f.facility_type.isin(["保育園", "保育所"])
    assert (cap.loc[nursery, "capacity_1"] == 0).all()
    assert f.facility_name.is_unique and f.block.isin(ref.BLOCKS).all()


def test_certifications_are_consistent(city, residents):
    certs = city["childcare_certifications.csv"]
    facilities = city["childcare_facilities.csv"].set_index("facility_id")
    people = residents.set_index("atena_no")
    assert certs.cert_no.is_unique and certs.cert_type.isin(ref.CERT_TYPES).all()
    assert (certs.cert_date <= certs.valid_from).all() and (certs.valid_from <= certs.valid_to).all()
    used = certs[certs.use_from.notna()]
    assert used.facility_id.notna().all()
    assert (used.use_from >= used.valid_from).all()
    assert (used.use_to.dropna() >= used.use_from[used.use_to.notna()]).all()
    assert (certs.use_from.dropna() <= pd.Timestamp(EXTRACT)).all()
    assert certs.loc[certs.facility_id.isna(), "use_from"].isna().all()
    child = people.loc[certs.atena_no]
    assert child.removed_date.isna().all()
    assert (certs.valid_from.values >= child.birth_date.values).all()
    assert (certs.cert_date.values >= child.registered_date.values).all()
    age_at_start = _age(pd.Series(child.birth_date.values), EXTRACT)
    assert (age_at_start <= 6).all()
    # 3号 ends the day before the third birthday; 1号/2号 start no earlier than it
    third = child.birth_date + pd.DateOffset(years=3)
    is3 = (certs.cert_type == "3号").values
    assert (certs.valid_to.values[is3] == (third.values[is3] - np.timedelta64(1, "D"))).all()
    assert (certs.valid_from.values[~is3] >= third.values[~is3]).all()
    # one current certification per child at the extract date
    current = certs[certs.valid_to >= pd.Timestamp(EXTRACT)]
    assert current.atena_no.is_unique
    # facilities only take the 号 they provide (a 0 capacity still means "provides" for こども園)
    placed = certs[certs.facility_id.notna()]
    kinds = placed.facility_id.map(facilities.facility_type)
    assert not ((placed.cert_type == "1号") & kinds.isin(["保育園", "保育所"])).any()
    assert not ((placed.cert_type != "1号") & (kinds == "公立幼稚園")).any()


def test_childcare_uptake_placement_and_capacity_edge_cases(city, current):
    certs = city["childcare_certifications.csv"]
    facilities = city["childcare_facilities.csv"].set_index("facility_id")
    fy_start = pd.Timestamp("2026-04-01")
    preschool = current[current.birth_date >= fy_start - pd.DateOffset(years=6) + pd.Timedelta(days=1)]
    uptake = certs.atena_no.nunique() / len(preschool)
    assert 0.55 <= uptake <= 0.80
    now = certs[(certs.valid_to >= pd.Timestamp(EXTRACT))]
    assert now.facility_id.isna().any()                      # some are not placed
    placed = now[now.facility_id.notna() & now.use_to.isna()]
    blocks = dict(zip(city["address_master.csv"].chome_code, city["address_master.csv"].block))
    child_block = placed.atena_no.map(dict(zip(current.atena_no, current.chome_code))).map(blocks)
    # most children go to a facility of their own block when it has one for their 号
    kinds = {"1号": ("こども園", "公立幼稚園"), "2号": ("こども園", "保育園", "保育所"),
             "3号": ("こども園", "保育園", "保育所")}
    offered = {(b, t) for t, ks in kinds.items() for b in facilities[facilities.facility_type.isin(ks)].block}
    local = [(b, t) in offered for b, t in zip(child_block, placed.cert_type)]
    same = (child_block == placed.facility_id.map(facilities.block))[local]
    assert len(same) > 20 and same.mean() > 0.6
    # at least one facility/号 with capacity 0 but children placed (occupancy +inf)
    enrolled = placed.groupby(["facility_id", "cert_type"]).size()
    capacity_col = {"1号": "capacity_1", "2号": "capacity_2", "3号": "capacity_3"}
    zero = [(f, t) for (f, t), n in enrolled.items() if int(facilities.loc[f, capacity_col[t]]) == 0]
    assert zero, "no facility with capacity 0 and placed children"


# --- resident tax ----------------------------------------------------------------------------

def test_resident_tax(city, residents):
    tax = city["resident_tax.csv"]
    tax[["tax_year", "taxable_income", "income_levy", "per_capita_levy"]] = \
        tax[["tax_year", "taxable_income", "income_levy", "per_capita_levy"]].astype("int64")
    assert set(tax.tax_year) == {2025, 2026}
    assert not tax.duplicated(["atena_no", "tax_year"]).any()
    assert (tax.per_capita_levy == 3500).all()
    assert (tax.income_levy == (tax.taxable_income * 6 // 100) // 100 * 100).all()
    people = residents.set_index("atena_no").loc[tax.atena_no]
    jan1 = pd.to_datetime(tax.tax_year.astype(str) + "-01-01").values
    assert (people.registered_date.values <= jan1).all()
    assert (people.removed_date.isna().values | (people.removed_date.values > jan1)).all()
    assert (_age(pd.Series(people.birth_date.values), dt.date(2025, 1, 1)) >= 17).all()
    adults = (_age(residents.birth_date, EXTRACT) >= 20) & residents.removed_date.isna()
    share = tax[tax.tax_year == 2026].atena_no.nunique() / adults.sum()
    assert 0.45 <= share <= 0.85
    median = tax.taxable_income[tax.taxable_income > 0].median()
    assert 1.0e6 <= median <= 3.5e6
    assert tax.taxable_income.max() >= 30_000_000 > 10 * median  # a dominant earner exists


# --- encodings, CLI, failure -----------------------------------------------------------------

def test_cp932_round_trip(tmp_path, city):
    generate(tmp_path / "sjis", population=N, seed=SEED, encoding="cp932")
    for name in HEADERS:
        raw = (tmp_path / "sjis" / name).read_bytes()
        text = raw.decode("cp932")
        assert text == (city["dir"] / name).read_text(encoding="utf-8"), name
        if name != "resident_tax.csv":  # (that one is all ASCII)
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
    manifest = json.loads((tmp_path / "sjis" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["encoding"] == "cp932"


def test_cli_writes_export_and_rejects_bad_options(tmp_path):
    from sekisho.cli import main
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--out", str(tmp_path / "x"), "--population", "1500",
                                  "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["population"] == 1500 and manifest["residents_current"] == 1500
    again = runner.invoke(main, ["synth", "--out", str(tmp_path / "y"), "--persons", "1500",
                                 "--seed", "2", "--quiet", "--extract-date", "2026-10-31"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "x" / "residents.csv").read_bytes() == (tmp_path / "y" / "residents.csv").read_bytes()
    bad = runner.invoke(main, ["synth", "--out", str(tmp_path / "z"), "--encoding", "latin-1"])
    assert bad.exit_code == 2 and "latin-1" in bad.output
    small = runner.invoke(main, ["synth", "--out", str(tmp_path / "z"), "--population", "10"])
    assert small.exit_code == 2
    with pytest.raises(SynthError, match="population"):
        generate(tmp_path / "z", population=10)


def test_other_extract_date_shifts_the_window(tmp_path):
    m = generate(tmp_path / "e", population=1500, seed=1, extract_date=dt.date(2025, 3, 31))
    assert m["window"] == ["2020-04-01", "2025-03-31"]
    moves = _read(tmp_path / "e", "movements.csv")
    assert moves.idou_date.between(pd.Timestamp("2020-04-01"), pd.Timestamp("2025-03-31")).all()
    tax = _read(tmp_path / "e", "resident_tax.csv")
    assert set(tax.tax_year.astype(int)) == {2024, 2025}


def test_failure_leaves_no_partial_export(tmp_path, monkeypatch):
    from sekisho.synth import output

    calls = {"n": 0}
    real_write = output.CsvSink.write

    def failing_write(self, table):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real_write(self, table)

    monkeypatch.setattr(output.CsvSink, "write", failing_write)
    out = tmp_path / "broken"
    with pytest.raises(OSError):
        generate(out, population=1500, seed=1)
    assert list(out.iterdir()) == []  # no CSV, no manifest, no staging directory


def test_a_child_has_at_most_one_certification_per_month_and_type():
    """The policy declares ``childcare.unique_per_person: [cert_ym, cert_type]``: the ingest
    refuses an export with two certifications of a child in one 認定年月 and 認定区分. The
    generator holds to it even where a child is certified twice in a month — a newcomer
    shortly before the third birthday gets a 3号 until the day before it and the 2号 from
    it — which is why 認定年月 alone would not identify a certification (stressed here:
    half the children move in within 90 days of their third birthday)."""
    import collections

    from sekisho.synth.childcare import build_facilities, certifications
    from sekisho.synth.dates import add_years, to_days, ymd
    from sekisho.synth.geography import build_geography

    geo = build_geography()
    facilities = build_facilities(np.random.default_rng(1), geo, 50_000)
    extract = to_days(dt.date(2026, 10, 31))
    rng = np.random.default_rng(5)
    n = 40_000
    birth = extract - rng.integers(0, 6 * 365, n)
    third = add_years(birth, 3)
    registered = np.where(rng.random(n) < 0.5, np.minimum(third - rng.integers(0, 90, n), extract), birth)
    certs = certifications(np.random.default_rng(9), extract, birth, registered, np.ones(n, bool),
                           rng.integers(0, 13, n), facilities)
    y, m, _ = ymd(certs.cert_date)
    month = (y * 100 + m).tolist()
    per_month = collections.Counter(zip(certs.person.tolist(), month))
    per_month_type = collections.Counter(zip(certs.person.tolist(), month, certs.cert_type.tolist()))
    assert sum(v > 1 for v in per_month.values()) > 0          # two in a month: 認定年月 alone is not a key
    assert max(per_month_type.values()) == 1                    # the declared key holds
