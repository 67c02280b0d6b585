"""The snapshot an export produces is pinned: digests of every table (column names and
types, then every row in ``ORDER BY ALL`` order) for two exports under a fixed instance
secret, recorded from the view builders that were Python code before the view
definitions moved into the policy (issue 16, item 4). The generic builder must produce
the very same tables; a digest that changes means an upload would change analysts'
answers, which is a change of behaviour and needs its own reason and commit.

Run this file directly to print the current digests:
``python tests/test_ingest_snapshot.py``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest_fixtures import EXTRACT, write_mini_city  # noqa: E402

# a fixed secret makes keyed IDs and record keys, and so the digests, reproducible
FIXED_SECRET = "5e" * 32
SYNTH_POPULATION = 600
SYNTH_SEED = 16

EXPECTED = {
    "mini_city": {
        "areas": "bbf340840444490ede8215b39164bf5a",
        "childcare": "fb9a81eab3066f38bfeb249596ce0d2b",
        "facilities": "f9eaae51024fd20716adfb89279c5bc6",
        "movements": "b896605ddf1c0865f5257e3fb976baa0",
        "resident_tax": "414be6bf38fff8511ef4a5ff86f4ffaa",
        "residents": "6e30ec643b7eb62568c7863b09d1f2db",
    },
    "synthetic_city": {
        "areas": "1613850bb863308c36d8a16911421011",
        "childcare": "7ce9e18ee600d6756f2342f9768b5924",
        "facilities": "caa692c730c042376035783740a0d692",
        "movements": "634bd9fefdae7bcfd0af0daba80692c4",
        "resident_tax": "8b46fcc7602df114f2dd569345870c52",
        "residents": "3bbb5f00283cb0ce40684ac7fcc719da",
    },
}


def table_digests(inst) -> dict[str, str]:
    """sha256 of each table of the current snapshot: its schema, then its rows sorted."""
    import duckdb

    from sekisho.store import Store

    store = Store(inst)
    path = store.snapshots_dir / store.current_id() / "data.duckdb"
    out = {}
    with duckdb.connect(str(path), read_only=True) as con:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]
        for table in tables:
            h = hashlib.sha256()
            for name, type_, *_ in con.execute(f'DESCRIBE "{table}"').fetchall():
                h.update(f"{name}:{type_}\n".encode())
            for row in con.execute(f'SELECT * FROM "{table}" ORDER BY ALL').fetchall():
                h.update((repr(row) + "\n").encode())
            out[table] = h.hexdigest()[:32]
    return out


def ingest_with_fixed_secret(home: Path, export: Path):
    from sekisho.ingest import ingest
    from sekisho.instance import Instance
    from sekisho.state import set_role

    inst = Instance.create(home)
    inst.secret_path.write_text(FIXED_SECRET)
    inst = Instance.open(home)          # secret is read lazily: reopen to be sure
    set_role(inst, "hanako", "steward")
    ingest(inst, export, user="hanako", extract_date=EXTRACT)
    return inst


def mini_city_digests(base: Path) -> dict[str, str]:
    write_mini_city(base / "mini-export")
    return table_digests(ingest_with_fixed_secret(base / "mini-home", base / "mini-export"))


def synthetic_city_digests(base: Path) -> dict[str, str]:
    from sekisho.synth import generate

    generate(base / "synth-export", population=SYNTH_POPULATION, seed=SYNTH_SEED)
    return table_digests(ingest_with_fixed_secret(base / "synth-home", base / "synth-export"))


@pytest.mark.parametrize("export, build", [("mini_city", mini_city_digests),
                                           ("synthetic_city", synthetic_city_digests)])
def test_every_table_is_identical_to_the_recorded_snapshot(tmp_path, export, build):
    assert build(tmp_path) == EXPECTED[export]


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({"mini_city": mini_city_digests(Path(tmp)),
                          "synthetic_city": synthetic_city_digests(Path(tmp))}, indent=4))
