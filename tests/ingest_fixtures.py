"""A small hand-made source export (ARCHITECTURE.md §2) for the ingest unit tests:
deterministic, a few dozen persons, every file and every kind of event, so a test can
break exactly one thing and see exactly that reported."""

from __future__ import annotations

import csv
import random
import re
from datetime import date, timedelta
from pathlib import Path

COLUMNS = {
    "residents.csv": ["atena_no", "setai_no", "name", "name_kana", "birth_date", "sex",
                      "relationship", "chome_code", "chome_name", "gaiku", "banchi", "address",
                      "registered_date", "removed_date", "removal_reason"],
    "address_master.csv": ["chome_code", "chome_name", "block", "gaiku", "lat", "lon"],
    "movements.csv": ["idou_id", "atena_no", "setai_no", "idou_type", "idou_date", "notified_date",
                      "from_pref_code", "from_muni_code", "from_muni_name", "to_pref_code",
                      "to_muni_code", "to_muni_name", "from_chome_code", "from_gaiku",
                      "to_chome_code", "to_gaiku"],
    "childcare_facilities.csv": ["facility_id", "facility_name", "facility_type", "block",
                                 "chome_code", "capacity_1", "capacity_2", "capacity_3"],
    "childcare_certifications.csv": ["cert_no", "atena_no", "cert_type", "cert_date", "valid_from",
                                     "valid_to", "facility_id", "use_from", "use_to"],
    "resident_tax.csv": ["atena_no", "tax_year", "taxable_income", "income_levy", "per_capita_levy"],
}

CHOME = [("2820140101", "飾磨区玉地１丁目", "飾磨", 34.7905, 134.6700),
         ("2820140102", "本町", "中部第一", 34.8390, 134.6940),
         ("2820140103", "網干区新在家", "網干", 34.7800, 134.5900)]
SURNAMES = ["山田", "佐藤", "鈴木", "高橋", "田中", "伊藤"]
SURNAMES_KANA = ["ヤマダ", "サトウ", "スズキ", "タカハシ", "タナカ", "イトウ"]
GIVEN = ["太郎", "花子", "一郎", "美咲", "健太", "陽菜"]
GIVEN_KANA = ["タロウ", "ハナコ", "イチロウ", "ミサキ", "ケンタ", "ヒナ"]
EXTRACT = date(2026, 10, 31)


def write_csv(path: Path, header: list[str], rows: list[dict], encoding: str = "utf-8") -> None:
    with open(path, "w", encoding=encoding, newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in header})


def mini_city(seed: int = 7, persons: int = 48) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    master = [{"chome_code": c, "chome_name": n, "block": b, "gaiku": str(g),
               "lat": f"{lat + g * 0.0011:.6f}", "lon": f"{lon + g * 0.0013:.6f}"}
              for c, n, b, lat, lon in CHOME for g in range(1, 5)]
    residents, movements, certs, tax = [], [], [], []
    for i in range(persons):
        atena = f"{1000000 + i * 37:010d}"
        setai = f"{5000000 + i // 3:010d}"
        loc = master[i % len(master)]
        if i == 0:
            birth = date(1921, 2, 3)           # 105 at the extract: top-coded
        elif i < 8:
            birth = date(2021, 1, 1) + timedelta(days=rng.randrange(0, 1500))  # children
        else:
            birth = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 25000))
        banchi = f"{rng.randrange(1, 30)}番{rng.randrange(1, 20)}号"
        s = i % len(SURNAMES)
        removed = None
        reason = None
        if i % 11 == 5:
            removed, reason = date(2024, 3, 15) + timedelta(days=i % 500), "転出"
        elif i == 0:
            removed, reason = date(2026, 1, 20), "死亡"
        registered = birth if birth > date(2021, 11, 1) else date(2003, 6, 1) + timedelta(days=i % 3000)
        residents.append({
            "atena_no": atena, "setai_no": setai,
            "name": f"{SURNAMES[s]} {GIVEN[i % len(GIVEN)]}{i}",
            "name_kana": f"{SURNAMES_KANA[s]} {GIVEN_KANA[i % len(GIVEN)]}",
            "birth_date": birth.isoformat(), "sex": str(1 + i % 2),
            "relationship": "世帯主" if i % 3 == 0 else ("子" if i < 8 else "妻"),
            "chome_code": loc["chome_code"], "chome_name": loc["chome_name"], "gaiku": loc["gaiku"],
            "banchi": banchi, "address": f"兵庫県姫路市{loc['chome_name']}{loc['gaiku']}番{banchi}",
            "registered_date": registered.isoformat(),
            "removed_date": removed.isoformat() if removed else None, "removal_reason": reason})
        base = {"atena_no": atena, "setai_no": setai}
        if birth > date(2021, 11, 1):
            movements.append({**base, "idou_type": "出生", "idou_date": birth.isoformat(),
                              "notified_date": (birth + timedelta(days=5)).isoformat(),
                              "to_chome_code": loc["chome_code"], "to_gaiku": loc["gaiku"]})
        if i % 7 == 3:
            d = date(2023, 4, 1) + timedelta(days=i % 700)
            movements.append({**base, "idou_type": "転入", "idou_date": d.isoformat(),
                              "notified_date": (d + timedelta(days=3)).isoformat(),
                              "from_pref_code": "27", "from_muni_code": "271004",
                              "from_muni_name": "大阪市",
                              "to_chome_code": loc["chome_code"], "to_gaiku": loc["gaiku"]})
        if i % 9 == 4:
            other = master[(i + 5) % len(master)]
            d = date(2025, 2, 10) + timedelta(days=i % 500)
            movements.append({**base, "idou_type": "転居", "idou_date": d.isoformat(),
                              "notified_date": d.isoformat(),
                              "from_chome_code": other["chome_code"], "from_gaiku": other["gaiku"],
                              "to_chome_code": loc["chome_code"], "to_gaiku": loc["gaiku"]})
        if reason == "転出":
            movements.append({**base, "idou_type": "転出", "idou_date": removed.isoformat(),
                              "notified_date": removed.isoformat(),
                              "to_pref_code": "13", "to_muni_code": "131016", "to_muni_name": "千代田区",
                              "from_chome_code": loc["chome_code"], "from_gaiku": loc["gaiku"]})
        if reason == "死亡":
            movements.append({**base, "idou_type": "死亡", "idou_date": removed.isoformat(),
                              "notified_date": removed.isoformat(),
                              "from_chome_code": loc["chome_code"], "from_gaiku": loc["gaiku"]})
        if 1 <= i < 8:
            age_days = (EXTRACT - birth).days
            ctype = "3号" if age_days < 3 * 365 else "2号"
            certs.append({"cert_no": f"C{i:05d}", "atena_no": atena, "cert_type": ctype,
                          "cert_date": "2025-03-10", "valid_from": "2025-04-01",
                          "valid_to": "2027-03-31", "facility_id": "F001" if i % 2 else None,
                          "use_from": "2025-04-01" if i % 2 else None, "use_to": None})
        if i >= 8:
            for year in (2024, 2025, 2026):
                income = rng.randrange(0, 8_000_000)
                tax.append({"atena_no": atena, "tax_year": str(year), "taxable_income": str(income),
                            "income_levy": str(income // 10), "per_capita_levy": "5000" if income else "0"})
    for n, m in enumerate(movements, start=1):
        m["idou_id"] = f"M{n:07d}"
    facilities = [
        {"facility_id": "F001", "facility_name": "しらさぎこども園", "facility_type": "こども園",
         "block": "飾磨", "chome_code": "2820140101", "capacity_1": "15", "capacity_2": "60",
         "capacity_3": "30"},
        {"facility_id": "F002", "facility_name": "ほんまち保育所", "facility_type": "保育所",
         "block": "中部第一", "chome_code": "2820140102", "capacity_1": "0", "capacity_2": "45",
         "capacity_3": "20"},
    ]
    return {"residents.csv": residents, "address_master.csv": master, "movements.csv": movements,
            "childcare_facilities.csv": facilities, "childcare_certifications.csv": certs,
            "resident_tax.csv": tax}


def write_mini_city(directory: Path, *, seed: int = 7, persons: int = 48,
                    encoding: str = "utf-8") -> dict[str, list[dict]]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = mini_city(seed, persons)
    for name, rows in data.items():
        write_csv(directory / name, COLUMNS[name], rows, encoding=encoding)
    return data


# ---- the shared synthetic city (conftest fixture ``ingested_instance``) -----------------

CITY_POPULATION = 4000
CITY_SEED = 20261123
CITY_USERS = {"steward": "suzuki", "analyst": "tanaka", "manager": "sato",
              "admin": "takahashi", "reports": "reports"}


class IngestedCity:
    """An instance holding a small synthetic city, ingested once per test session.

    ``instance`` (sekisho.instance.Instance), ``source_dir`` (the raw export, with
    ``manifest.json``), ``manifest``, ``result`` (sekisho.ingest.IngestResult), and the
    user names ``steward``, ``analyst``, ``manager``, ``admin``, ``reports`` (also in
    ``users``: role -> name). The home lives in a directory the service account can
    reach, so tests that drop privileges or spawn services can use it.
    """

    def __init__(self, instance, source_dir: Path, manifest: dict, result, base: Path):
        self.instance = instance
        self.source_dir = source_dir
        self.manifest = manifest
        self.result = result
        self.base = base
        self.users = dict(CITY_USERS)
        for role, name in CITY_USERS.items():
            setattr(self, role, name)

    @property
    def home(self) -> Path:
        return self.instance.home


def build_ingested_city(source_dir: Path, population: int = CITY_POPULATION,
                        seed: int = CITY_SEED) -> IngestedCity:
    import tempfile

    from sekisho.ingest import ingest
    from sekisho.instance import Instance
    from sekisho.state import set_role
    from sekisho.synth import generate

    manifest = generate(source_dir, population=population, seed=seed)
    base = Path(tempfile.mkdtemp(prefix="sekisho-city-"))
    base.chmod(0o755)
    inst = Instance.create(base / "home")
    for role, name in CITY_USERS.items():
        set_role(inst, name, role)
    result = ingest(inst, source_dir, user=CITY_USERS["steward"])
    return IngestedCity(inst, Path(source_dir), manifest, result, base)


# ---- scanning a store for raw values ------------------------------------------------------

CANDIDATE_PATTERNS = [
    re.compile(r"\d{4}-\d{2}-\d{2}"),                         # exact dates
    re.compile(r"\d{6,}"),                                     # identifiers (宛名番号, 世帯番号, ...)
    re.compile(r"[^\x00-\x7f,\n\"]+[ \u3000][^\x00-\x7f,\n\"]+"),  # 姓 名 / セイ メイ
    re.compile(r"\d+番\d+号"),                                  # 番地・号
    re.compile(r"兵庫県[^,\n\"\x00]*"),                         # full addresses
]


def _candidates(text: str) -> set[str]:
    """Every field value, and every substring shaped like a raw identifier, date, name or
    address, so the needles can be looked up with one set intersection."""
    out = set(re.split(r'[,\n\r"\x00]', text))
    for pattern in CANDIDATE_PATTERNS:
        for m in pattern.findall(text):
            out.add(m)
            if m.isdigit():   # an identifier embedded in a longer digit run
                out |= {m[i:i + 10] for i in range(len(m) - 9)}
                out |= {m[i:i + 12] for i in range(len(m) - 11)}
    return out


def scan_store(inst, needles: set[str], *, sample: int = 100) -> set[str]:
    """Every value of every table as text, and the raw bytes of every snapshot file.
    Also fails on DATE/TIMESTAMP columns and on any YYYY-MM-DD value in a table."""
    from sekisho.store import Store

    store = Store(inst)
    con = store.connect()
    text = []
    for t in con.list_tables():
        schema = con.table(t).schema()
        for col, typ in schema.items():
            assert not (typ.is_date() or typ.is_timestamp()), f"{t}.{col} keeps a day-precision date"
        text.append(con.table(t).to_pandas().to_csv(index=False))
    con.disconnect()
    blob = "\n".join(text)
    assert not re.search(r"\d{4}-\d{2}-\d{2}", blob), "a YYYY-MM-DD value remains"
    binaries = [p.read_bytes() for p in (store.snapshots_dir / store.current_id()).rglob("*")
                if p.is_file()]
    candidates = _candidates(blob)
    for raw in binaries:
        candidates |= _candidates(raw.decode("utf-8", errors="replace"))
    found = needles & candidates
    # belt and braces: a plain substring search for a sample of the needles
    for n in random.Random(0).sample(sorted(needles), min(sample, len(needles))):
        if n in blob or any(n.encode() in raw for raw in binaries):
            found.add(n)
    return found


