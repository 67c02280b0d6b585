"""GUARD's own small store fixture: an instance whose snapshot holds random data with the
view schemas of ARCHITECTURE.md §3 (plus ``_rkey``), written through ``Store.writer``.

Used where a test needs exact control of the data (planted rare persons, a dominant
tax payer, known group sizes). The end-to-end tests use the real synth -> ingest
pipeline instead (``real_instance`` in test_guard.py)."""

from __future__ import annotations

import random
from pathlib import Path

from sekisho.instance import Instance
from sekisho.state import set_role
from sekisho.store import Store

BLOCKS = ["安富", "家島", "広畑", "香寺", "飾磨", "西部", "中部第一", "中部第二", "東部", "灘", "北部", "夢前", "網干"]
BANDS = ["0-4", "5-9", "10-14", "15-19", "20-24", "25-29", "30-34", "35-39", "40-44", "45-49", "50-54",
         "55-59", "60-64", "65-69", "70-74", "75-79", "80-84", "85-89", "90-94", "95-99", "100+"]


def band(age: int) -> str:
    return "100+" if age >= 100 else BANDS[age // 5]


def make_instance(home: Path, *, persons: int = 3000, seed: int = 7, planted: bool = True) -> Instance:
    """An instance with users ``ana`` (analyst), ``rep`` (reports), ``stew`` (steward)
    and a snapshot of ``persons`` random residents. With ``planted``: a lone 100+ year
    old woman in 家島 chome 2820149999 (a rare group), and in resident_tax a dominant
    taxpayer in 安富 for tax_year 2025."""
    inst = Instance.create(home)
    set_role(inst, "ana", "analyst")
    set_role(inst, "ana2", "analyst")
    set_role(inst, "rep", "reports")
    set_role(inst, "stew", "steward")
    rng = random.Random(seed)
    residents, tax, moves, care = [], [], [], []
    for i in range(persons):
        pid = f"p{i:07d}"
        hh = f"h{i // 3:07d}"
        age = min(int(rng.expovariate(1 / 40)), 99)
        sex = rng.choice(["男", "女"])
        blk = BLOCKS[i % 13] if i % 2 else rng.choice(BLOCKS)
        chome = f"282014{(i % 150):04d}"
        rkey = rng.randrange(256)
        residents.append((pid, hh, sex, age, band(age), "世帯主" if i % 3 == 0 else "子", chome, blk, True, rkey))
        for year in (2024, 2025):
            income = int(rng.lognormvariate(14.5, 0.6))
            tax.append((pid, year, income // 10, income, 5000, sex, band(age), blk, rng.randrange(256)))
        for m in range(i % 3):
            moves.append((pid, hh, rng.choice(["転入", "転出", "転居"]), 2022 + m, sex, age, band(age), blk,
                          rng.randrange(256)))
        if age < 6:
            care.append((pid, rng.choice(["1号", "2号", "3号"]), f"F{i % 40:03d}", blk, sex, age, rng.randrange(256)))
    if planted:
        residents.append(("p_rare", "h_rare", "女", 100, "100+", "世帯主", "2820149999", "家島", True, 17))
        tax.append(("p_rich", 2025, 900_000_000, 9_000_000_000, 5000, "男", "50-54", "安富", 99))
    store = Store(inst)
    with store.writer(policy_version=inst.policy_version) as w:
        con = w.connect()
        con.execute("CREATE TABLE residents (person_id VARCHAR, household_id VARCHAR, sex VARCHAR, age BIGINT, "
                    "age_band VARCHAR, relationship VARCHAR, chome_code VARCHAR, block VARCHAR, is_current BOOLEAN, "
                    "_rkey SMALLINT)")
        con.executemany("INSERT INTO residents VALUES (?,?,?,?,?,?,?,?,?,?)", residents)
        con.execute("CREATE TABLE resident_tax (person_id VARCHAR, tax_year BIGINT, income_levy BIGINT, "
                    "taxable_income BIGINT, per_capita_levy BIGINT, sex VARCHAR, age_band VARCHAR, block VARCHAR, "
                    "_rkey SMALLINT)")
        con.executemany("INSERT INTO resident_tax VALUES (?,?,?,?,?,?,?,?,?)", tax)
        con.execute("CREATE TABLE movements (person_id VARCHAR, household_id VARCHAR, idou_type VARCHAR, "
                    "idou_year BIGINT, sex VARCHAR, age BIGINT, age_band VARCHAR, block VARCHAR, _rkey SMALLINT)")
        con.executemany("INSERT INTO movements VALUES (?,?,?,?,?,?,?,?,?)", moves)
        con.execute("CREATE TABLE childcare (person_id VARCHAR, cert_type VARCHAR, facility_id VARCHAR, "
                    "block VARCHAR, sex VARCHAR, age BIGINT, _rkey SMALLINT)")
        con.executemany("INSERT INTO childcare VALUES (?,?,?,?,?,?,?)", care)
        con.execute("CREATE TABLE facilities (facility_id VARCHAR, facility_name VARCHAR, facility_type VARCHAR, "
                    "block VARCHAR, chome_code VARCHAR, capacity_1 BIGINT, capacity_2 BIGINT, capacity_3 BIGINT)")
        con.executemany("INSERT INTO facilities VALUES (?,?,?,?,?,?,?,?)",
                        [(f"F{j:03d}", f"施設{j}", rng.choice(["こども園", "保育所"]), BLOCKS[j % 13],
                          f"282014{j:04d}", 10 + j, 20, 15) for j in range(40)])
        con.execute("CREATE TABLE areas (chome_code VARCHAR, chome_name VARCHAR, block VARCHAR)")
        con.executemany("INSERT INTO areas VALUES (?,?,?)",
                        [(f"282014{j:04d}", f"町{j}", BLOCKS[j % 13]) for j in range(150)])
        con.close()
        w.commit()
    return inst


def truth(inst: Instance, sql: str):
    """Run SQL directly on the current snapshot (test oracle only; never for analysts)."""
    import duckdb

    store = Store(inst)
    path = store.snapshots_dir / store.current_id() / "data.duckdb"
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()
