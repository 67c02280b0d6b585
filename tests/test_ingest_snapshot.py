"""The snapshot an export produces is pinned: digests of every table (column names and
types, then every row in ``ORDER BY ALL`` order) for two exports under a fixed instance
secret, recorded from the view builders that were Python code before the view
definitions moved into the policy (issue 16, item 4). The generic builder must produce
the very same tables; a digest that changes means an upload would change analysts'
answers, which is a change of behaviour and needs its own reason and commit.

Columns added to a view since (``ADDED``: the band columns of issue 18) are left out of
``EXPECTED``, so the recorded digests still pin every column that existed, unchanged; the
tables as they are now, added columns included, are pinned in ``EXPECTED_WHOLE``.

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


# columns added after the digests in EXPECTED were recorded (issue 18: bands in the policy)
ADDED = {
    "residents": ("household_levy_band",),
    "movements": ("household_levy_band",),
    "childcare": ("fee_tax_year", "household_levy_band"),
    "resident_tax": ("income_levy_band", "household_levy_band"),
}
EXPECTED_WHOLE = {
    "mini_city": {
        "areas": "bbf340840444490ede8215b39164bf5a",
        "childcare": "09c7481a24ae7636c17a10f3a840d50f",
        "facilities": "f9eaae51024fd20716adfb89279c5bc6",
        "movements": "8f7c586d8f7d75ef333864e55f5dacd0",
        "resident_tax": "715463d97dbce7be6aef133480a05917",
        "residents": "f3f7c03f1caeddad2642e3e69c464668",
    },
    "synthetic_city": {
        "areas": "1613850bb863308c36d8a16911421011",
        "childcare": "47bc0e17a6acd4f0a358d183d57dea82",
        "facilities": "caa692c730c042376035783740a0d692",
        "movements": "5cf6439028963358c736ea375652329a",
        "resident_tax": "219cd07474f2f0b6b1f07fe01a5c7a65",
        "residents": "c97d29dbc6f2fe150aa0b3a3afb599aa",
    },
}


def table_digests(inst, without: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """sha256 of each table of the current snapshot: its schema, then its rows sorted
    (``without``: per table, columns left out, as if the table had never had them)."""
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
            left_out = set((without or {}).get(table, ()))
            described = [(name, type_) for name, type_, *_ in con.execute(f'DESCRIBE "{table}"').fetchall()]
            assert left_out <= {name for name, _ in described}, (table, left_out)
            kept = [(name, type_) for name, type_ in described if name not in left_out]
            for name, type_ in kept:
                h.update(f"{name}:{type_}\n".encode())
            columns = ", ".join(f'"{name}"' for name, _ in kept)
            for row in con.execute(f'SELECT {columns} FROM "{table}" ORDER BY ALL').fetchall():
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


def mini_city_digests(base: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(digests without the added columns, digests of the whole tables)."""
    write_mini_city(base / "mini-export")
    inst = ingest_with_fixed_secret(base / "mini-home", base / "mini-export")
    return table_digests(inst, ADDED), table_digests(inst)


def synthetic_city_digests(base: Path) -> tuple[dict[str, str], dict[str, str]]:
    from sekisho.synth import generate

    generate(base / "synth-export", population=SYNTH_POPULATION, seed=SYNTH_SEED)
    inst = ingest_with_fixed_secret(base / "synth-home", base / "synth-export")
    return table_digests(inst, ADDED), table_digests(inst)


@pytest.mark.parametrize("export, build", [("mini_city", mini_city_digests),
                                           ("synthetic_city", synthetic_city_digests)])
def test_every_table_is_identical_to_the_recorded_snapshot(tmp_path, export, build):
    recorded, whole = build(tmp_path)
    assert recorded == EXPECTED[export]         # every column that existed is unchanged
    assert whole == EXPECTED_WHOLE[export]      # and the added ones are pinned too


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mini, synthetic = mini_city_digests(Path(tmp)), synthetic_city_digests(Path(tmp))
        print(json.dumps({"EXPECTED": {"mini_city": mini[0], "synthetic_city": synthetic[0]},
                          "EXPECTED_WHOLE": {"mini_city": mini[1], "synthetic_city": synthetic[1]}}, indent=4))
