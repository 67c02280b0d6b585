"""GUARD's own small store fixture: an instance whose snapshot holds random data with the
view schemas of ARCHITECTURE.md §3 (plus ``_rkey``), written through ``Store.writer``.

Used where a test needs exact control of the data (planted rare persons, a dominant
tax payer, known group sizes). The end-to-end tests use the real synth -> ingest
pipeline instead (``ingested_instance`` and ``real_city`` in conftest.py).

conftest.py builds each kind of city once per session and hands out copies
(``copy_instance``, ``copy_city``): ``shared_city`` for read-only tests, which must leave
it as ``frozen_state`` found it, and ``own_city`` / ``real_city`` for a module that
changes its city."""

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


def _load(con, table: str, rows: list[tuple]) -> None:
    """Bulk insert (DuckDB's executemany is row by row and slow)."""
    import pandas as pd

    names = [r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()]
    frame = pd.DataFrame(rows, columns=names)
    con.register("_frame", frame)
    con.execute(f'INSERT INTO "{table}" SELECT * FROM _frame')
    con.unregister("_frame")


def make_instance(home: Path, *, persons: int = 3000, seed: int = 7, planted: bool = True,
                  holds: bool = False) -> Instance:
    """An instance with users ``ana`` (analyst), ``rep`` (reports), ``stew`` (steward)
    and a snapshot of ``persons`` random residents. With ``planted``: a lone 100+ year
    old woman in 家島 chome 2820149999 (a rare group), and in resident_tax a dominant
    taxpayer in 安富 for tax_year 2025. Without ``holds`` the policy's
    ``disclosure.alerts.pause_on`` is emptied: tests of what single answers reveal must
    not be refused because an earlier test on the instance raised an alert (alerts are
    still audited; holds are tested in test_guard_holds.py)."""
    inst = Instance.create(home)
    if not holds:
        import re

        text = inst.policy_path.read_text(encoding="utf-8")
        inst.policy_path.write_text(re.sub(r"(?m)^(\s+pause_on:).*$", r"\1 []", text), encoding="utf-8")
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
        _load(con, "residents", residents)
        con.execute("CREATE TABLE resident_tax (person_id VARCHAR, tax_year BIGINT, income_levy BIGINT, "
                    "taxable_income BIGINT, per_capita_levy BIGINT, sex VARCHAR, age_band VARCHAR, block VARCHAR, "
                    "_rkey SMALLINT)")
        _load(con, "resident_tax", tax)
        con.execute("CREATE TABLE movements (person_id VARCHAR, household_id VARCHAR, idou_type VARCHAR, "
                    "idou_year BIGINT, sex VARCHAR, age BIGINT, age_band VARCHAR, block VARCHAR, _rkey SMALLINT)")
        _load(con, "movements", moves)
        con.execute("CREATE TABLE childcare (person_id VARCHAR, cert_type VARCHAR, facility_id VARCHAR, "
                    "block VARCHAR, sex VARCHAR, age BIGINT, _rkey SMALLINT)")
        _load(con, "childcare", care)
        con.execute("CREATE TABLE facilities (facility_id VARCHAR, facility_name VARCHAR, facility_type VARCHAR, "
                    "block VARCHAR, chome_code VARCHAR, capacity_1 BIGINT, capacity_2 BIGINT, capacity_3 BIGINT)")
        con.executemany("INSERT INTO facilities VALUES (?,?,?,?,?,?,?,?)",
                        [(f"F{j:03d}", f"施設{j}", rng.choice(["こども園", "保育所"]), BLOCKS[j % 13],
                          f"282014{j:04d}", 10 + j, 20, 15) for j in range(40)])
        con.execute("CREATE TABLE areas (chome_code VARCHAR, chome_name VARCHAR, block VARCHAR)")
        con.executemany("INSERT INTO areas VALUES (?,?,?)",
                        [(f"282014{j:04d}", f"町{j}", BLOCKS[j % 13]) for j in range(150)])
        # the remaining policy columns exist (NULL), so SELECT * expands as on a real store
        from sekisho.guard.catalog import SQL_TYPES
        from sekisho.policy import load_instance_policy
        for view in load_instance_policy(inst).views.values():
            have = {r[0] for r in con.execute(f'DESCRIBE "{view.name}"').fetchall()}
            for col in view.columns.values():
                if col.name not in have:
                    con.execute(f'ALTER TABLE "{view.name}" ADD COLUMN "{col.name}" {SQL_TYPES[col.type]}')
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


def new_snapshot(inst: Instance, change, *, rebuilt: tuple[str, ...] = ()) -> None:
    """A new snapshot: the current one's tables copied, except those named in ``rebuilt``,
    then ``change(con)`` with the current snapshot attached as ``old`` (read-only)."""
    store = Store(inst)
    old = store.snapshots_dir / store.current_id() / "data.duckdb"
    with store.writer(policy_version=inst.policy_version) as w:
        con = w.connect()
        con.execute(f"ATTACH '{old}' AS old (READ_ONLY)")
        for (name,) in con.execute("SELECT table_name FROM information_schema.tables "
                                   "WHERE table_catalog = 'old'").fetchall():
            if name not in rebuilt:
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM old."{name}"')
        change(con)
        con.execute("DETACH old")
        con.close()
        w.commit()


def add_snapshot(inst: Instance, residents: list[tuple]) -> None:
    """A new snapshot = the current one plus ``residents`` rows (a data update)."""
    def insert(con) -> None:
        for row in residents:
            values = dict(zip(("person_id", "household_id", "sex", "age", "age_band", "relationship",
                               "chome_code", "block", "is_current", "_rkey"), row))
            con.execute(f"INSERT INTO residents ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                        list(values.values()))
    new_snapshot(inst, insert)


def copy_instance(src: Instance, home: Path) -> Instance:
    """A copy of the instance ``src`` at ``home``: the same data, keys (so the same noise),
    users, policy and audit trail, in milliseconds rather than the seconds ``make_instance``
    takes. ``src`` must not be in use (a template nobody queries), so that its SQLite and
    DuckDB files are whole on disk."""
    import shutil

    from sekisho.instance import secure_tree

    shutil.copytree(src.home, home)
    secure_tree(home)   # owned by the service account, private, as Instance.create leaves it
    return Instance.open(home)


# audit entries a read-only test may add: its queries, and the alerts they raise (make_instance
# pauses nobody on an alert, so an alert changes no answer; a test that counts alerts runs on
# a city of its own, where no other module's queries have added to the counters)
READ_ONLY_ENTRY_TYPES = frozenset({"query.request", "query", "query.refused", "alert"})


def frozen_state(inst: Instance) -> dict:
    """What a read-only test must leave as it found it: every file of the store (the
    snapshots and which one is current), the policy files, config.yaml and the keys, the
    users and their roles, the users on hold, and an audit trail that only grew by queries
    and their alerts. The DP ledger and the alert counters are not in it: queries write them."""
    import hashlib

    from sekisho.guard.holds import holds
    from sekisho.state import list_users

    paths = [*inst.store_dir.rglob("*"), *inst.policy_dir.rglob("*"),
             inst.config_path, inst.secret_path, inst.audit_key_path]
    files = {str(f.relative_to(inst.home)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(paths) if f.is_file() and f.name != "writer.lock"}
    return {
        "files": files,
        "users": [(name, role) for name, role, _ in list_users(inst)],
        "holds": [h["user"] for h in holds(inst)],
        "audit": [(e["seq"], e["type"]) for e in inst.audit.entries()
                  if e["type"] not in READ_ONLY_ENTRY_TYPES],
    }


def changes(before: dict, after: dict, parts=("files", "users", "holds", "audit")) -> list[str]:
    """The ``parts`` of two ``frozen_state`` results that differ, named for a failure message."""
    out = []
    for part in parts:
        if part == "files":
            names = sorted(set(before["files"]) | set(after["files"]))
            out += [f"file {n}" for n in names if before["files"].get(n) != after["files"].get(n)]
        elif before[part] != after[part]:
            added = [x for x in after[part] if x not in before[part]]
            gone = [x for x in before[part] if x not in after[part]]
            out.append(f"{part}: added {added}, removed {gone}")
    return out


def copy_city(city):
    """A copy of an ``IngestedCity`` (``build_ingested_city``) that nobody queries: its instance
    copied into a new base directory the service account can reach, as the original's;
    the raw export, manifest and ingest result are the original's. Remove ``.base`` after."""
    import tempfile

    from ingest_fixtures import IngestedCity

    base = Path(tempfile.mkdtemp(prefix="sekisho-city-"))
    base.chmod(0o755)
    return IngestedCity(copy_instance(city.instance, base / "home"), city.source_dir, city.manifest,
                        city.result, base)


IBIS_TYPES = {"string": "string", "integer": "int64", "boolean": "boolean", "float": "float64"}


def ibis_table(guard, user: str, view: str):
    """An unbound ibis table with the view's schema as the guard describes it."""
    import ibis

    cols = guard.views(user)[view]["columns"]
    return ibis.table({name: IBIS_TYPES[c["type"]] for name, c in cols.items()}, name=view)
