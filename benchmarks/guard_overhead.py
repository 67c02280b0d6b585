"""Guard overhead: the same grouped aggregates run raw on DuckDB and through the guard
(threshold mode, plan cache warm, audit and alerts included), at 530k and 5M residents.
The raw baseline is what an ibis or DuckDB user runs: ``execute(sql).to_arrow_table()``.
The guard runs its cached plans as DuckDB prepared statements fetched in small Arrow
batches (``ARROW_BATCH_ROWS``), writes the request's audit entry while the store executes
and the outcome's fsync after the answer (see ARCHITECTURE §5); a second, stricter
baseline runs the raw SQL the way the guard runs its own (prepared, same batches), so
what those two choices save is shown apart from the guard's own cost. After
each guarded run the benchmark waits (untimed) for the guard's work after the answer
(the outcome's fsync, the alert counters), so that work is not charged to the next raw
run: the ratio compares answer latencies on an otherwise idle machine.
Prints per-query medians, then each query's first run (cold: the guard's plan cache is
empty, and both DuckDB connections run the statement for the first time; the first query
on a view also pays the guard's one-off check that the view has one row per person) and,
last, the median ratio guarded/raw (warm) at the smallest size (target <= 1.25 at 530k).

The 5M city is the 530k city's store scaled up x10 (each resident copied with a new
person_id and a fresh random record key) — synthesising and ingesting 5M persons takes
far longer than the comparison needs.

    python benchmarks/guard_overhead.py [--home DIR] [--persons 530495] [--scale 10] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, city_instance, snapshot_path  # noqa: E402

from sekisho.guard import Guard  # noqa: E402
from sekisho.guard.execution import ARROW_BATCH_ROWS  # noqa: E402
from sekisho.ingest import views  # noqa: E402
from sekisho.instance import Instance  # noqa: E402
from sekisho.state import set_role  # noqa: E402
from sekisho.store import Store  # noqa: E402

QUERIES = [
    "SELECT block, age_band, sex, COUNT(*) AS n FROM residents GROUP BY block, age_band, sex",
    "SELECT chome_code, COUNT(*) AS n FROM residents WHERE is_current GROUP BY chome_code",
    "SELECT block, COUNT(*) AS n, COUNT(DISTINCT household_id) AS households FROM residents GROUP BY block",
    "SELECT age, COUNT(*) AS n FROM residents WHERE block = '飾磨' GROUP BY age",
]


def scaled_instance(base: Instance, factor: int, home: Path) -> Instance:
    if (home / "config.yaml").exists() and Store(Instance.open(home)).current_id():
        inst = Instance.open(home)
        set_role(inst, ANALYST, "analyst")
        return inst
    inst = Instance.create(home, exist_ok=True)
    set_role(inst, ANALYST, "analyst")
    with Store(inst).writer(policy_version=inst.policy_version) as w:
        con = w.connect()
        con.execute(f"ATTACH '{snapshot_path(base)}' AS src (READ_ONLY)")
        for (name,) in con.execute("SELECT table_name FROM information_schema.tables "
                                   "WHERE table_catalog = 'src'").fetchall():
            if name == "residents":
                cols = [r[0] for r in con.execute("DESCRIBE src.residents").fetchall()]
                proj = ", ".join(
                    "person_id || '-' || CAST(i AS VARCHAR) AS person_id" if c == "person_id" else
                    "household_id || '-' || CAST(i AS VARCHAR) AS household_id" if c == "household_id" else
                    "CAST(floor(random() * 256) AS SMALLINT) AS _rkey" if c == "_rkey" else f'"{c}"'
                    for c in cols)
                con.execute(f"CREATE TEMP VIEW scaled AS SELECT {proj} FROM src.residents, range({factor}) r(i)")
                views.write(con, "scaled", "residents")   # as ingest writes a view
            else:
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM src."{name}"')
        con.execute("DETACH src")
        con.close()
        w.commit()
    return inst


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(inst: Instance, repeat: int) -> tuple[float, float, int, float]:
    guard = Guard(inst)
    # time the answer's own thread spends in audit appends (the outcome entry; the request
    # entry is written on the guard's audit thread while the store executes the query)
    audit_time = [0.0]
    append = inst.audit.append
    caller = threading.get_ident()

    def timed_append(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return append(*args, **kwargs)
        finally:
            if threading.get_ident() == caller:
                audit_time[0] += time.perf_counter() - t0
    inst.audit.append = timed_append
    raw = duckdb.connect(str(snapshot_path(inst)), read_only=True)
    # a second baseline: the raw SQL as a DuckDB prepared statement fetched in the guard's
    # batch size, as the guard runs its cached plans — shows how much of the comparison is
    # planning and fetching rather than the guard's own work
    prepared = raw.cursor()
    n = raw.execute("SELECT COUNT(*) FROM residents").fetchone()[0]
    print(f"-- {n} residents", flush=True)
    # open the snapshot once (a service does it at its first query), so that the first
    # run of each query below times an empty plan cache rather than opening the store
    guard.snapshots.current()
    ratios, ratios_no_audit, cold_ratios, prepared_ratios = [], [], [], []
    for number, sql in enumerate(QUERIES):
        prepared.execute(f"PREPARE bench{number} AS {sql}")
        raw_cold = timed(lambda: raw.execute(sql).to_arrow_table())
        guard_cold = timed(lambda: guard.query(sql, user=ANALYST))
        for _ in range(2):  # warm caches on both sides
            raw.execute(sql).to_arrow_table()
            guard.query(sql, user=ANALYST)
        raw_t, guard_t, audit_t, prep_t = [], [], [], []
        for _ in range(repeat):
            raw_t.append(timed(lambda: raw.execute(sql).to_arrow_table()))
            prep_t.append(timed(lambda: prepared.execute(f"EXECUTE bench{number}").to_arrow_table(ARROW_BATCH_ROWS)))
            audit_time[0] = 0.0
            guard_t.append(timed(lambda: guard.query(sql, user=ANALYST)))
            audit_t.append(audit_time[0])
            # the guard's work after the answer (the outcome's fsync, alert counters) is
            # not charged to the next raw run: wait for it outside the timings
            guard.flush()
        r, g, a = statistics.median(raw_t), statistics.median(guard_t), statistics.median(audit_t)
        ratios.append(g / r)
        ratios_no_audit.append((g - a) / r)
        prepared_ratios.append(g / statistics.median(prep_t))
        cold_ratios.append(guard_cold / raw_cold)
        print(f"raw {r * 1000:8.1f} ms  guarded {g * 1000:8.1f} ms (audit append {a * 1000:5.1f} ms)  "
              f"ratio {g / r:5.2f}  without audit {(g - a) / r:5.2f}  "
              f"vs raw as the guard runs it {prepared_ratios[-1]:5.2f}  "
              f"{sql[:60]}", flush=True)
        print(f"    first run (cold, plan cache empty): raw {raw_cold * 1000:8.1f} ms  "
              f"guarded {guard_cold * 1000:8.1f} ms  ratio {guard_cold / raw_cold:5.2f}", flush=True)
    raw.close()
    guard.close()
    return (statistics.median(ratios), statistics.median(ratios_no_audit), n, statistics.median(cold_ratios),
            statistics.median(prepared_ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--scale", type=int, default=10, help="also measure this many times the city (0: skip)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    base = city_instance(args.home, args.persons)
    results = [(args.persons, measure(base, args.repeat))]
    if args.scale > 1:
        big = scaled_instance(base, args.scale, base.home.parent / f"home-x{args.scale}")
        results.append((args.persons * args.scale, measure(big, args.repeat)))
    # the residents view also holds persons removed during the 5-year window (除票), so it
    # has more rows than the city's population
    for size, (_, _, rows, _, prep) in reversed(results):
        print(f"median ratio guarded/raw prepared in the guard's batches, {size} persons ({rows} rows): {prep:.2f}")
    for size, (_, _, rows, cold, _) in reversed(results):
        print(f"median ratio guarded/raw on the first (cold) run, {size} persons ({rows} rows): {cold:.2f}")
    for size, (_, no_audit, rows, _, _) in reversed(results):
        print(f"median ratio guarded/raw without the audit append on the answer's thread, {size} persons "
              f"({rows} rows): {no_audit:.2f}")
    for size, (ratio, _, rows, _, _) in reversed(results):
        print(f"median ratio guarded/raw at {size} persons ({rows} resident rows): {ratio:.2f}")


if __name__ == "__main__":
    main()
