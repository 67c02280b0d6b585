"""Where the guard's overhead goes, on the 530k city (a diagnostic beside guard_overhead.py).

For each small query of guard_overhead.py, in one process and interleaved with the raw run:

* the time of each step of ``Guard.query`` as it runs in the loop (after a DuckDB scan the
  guard's Python runs with cold CPU caches, so these are larger than in a micro-benchmark);
* the store's part: the raw SQL and the guard's cells SQL (with the hidden contributor
  count and cell key), both as prepared statements on the raw connection, fetched in the
  guard's Arrow batches (``ARROW_BATCH_ROWS``), as the guard runs its own;
* a lower bound: the same guard with threshold protection replaced by a pass-through of
  the true counts. Measurement only — that guard's answers are never used; it shows how
  much of the ratio protection accounts for, and what is left without it (audit, role
  lookup, the cell key in the store's query).

    python benchmarks/guard_overhead_breakdown.py [--home DIR] [--repeat 40]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, city_instance, snapshot_path  # noqa: E402
from guard_overhead import QUERIES  # noqa: E402

import sekisho.guard.protection as protection  # noqa: E402
import sekisho.guard.session as session  # noqa: E402
from sekisho.guard import Guard  # noqa: E402
from sekisho.guard.cells import cells_sql  # noqa: E402
from sekisho.guard.protect.threshold import ProtectionStats, counted  # noqa: E402

from sekisho.guard.execution import ARROW_BATCH_ROWS  # noqa: E402
from sekisho.guard.protection import one_row_per_contributor  # noqa: E402


def steps(guard: Guard) -> list[tuple[object, str, str]]:
    """(owner, attribute, label) of each stage timed: the pipeline's stages and the
    protection's own steps."""
    return [(session, "open_session", "session"), (guard.snapshots, "current", "snapshot"),
            (guard.plans, "plan", "planning"), (guard.recorder, "announce", "request entry"),
            (protection, "fetch", "execution"), (protection.ThresholdProtection, "_check_population", "population"),
            (protection, "to_arrow", "to Arrow"), (guard.post, "run", "post-processing"),
            (guard.recorder, "_audit_and_alert", "outcome entry")]


def pass_through(cells, aggregates, domains, **_):
    """The lower bound's 'protection': the true counts, unprotected (measurement only)."""
    out = {name: column for name, column in cells.items() if name.startswith("__g")}
    for j, agg in enumerate(aggregates):
        out[f"__v{j}"] = counted(cells, j, agg.kind)
    return out, ProtectionStats(cells=len(cells["__n"]))


def instrument(guard: Guard, spent: dict) -> None:
    def timed(fn, label):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t0
        return wrapper
    for owner, attribute, label in steps(guard):
        original = getattr(owner, attribute)
        if isinstance(owner, type):
            original = staticmethod(timed(original, label))
            setattr(owner, attribute, original)
        else:
            setattr(owner, attribute, timed(original, label))
    protection.protect_threshold = timed(protection.protect_threshold, "protect_threshold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    inst = city_instance(args.home, args.persons)
    raw = duckdb.connect(str(snapshot_path(inst)), read_only=True)
    guard = Guard(inst)
    spent: dict[str, float] = collections.defaultdict(float)
    instrument(guard, spent)
    protect = protection.protect_threshold
    for sql in QUERIES:
        if "COUNT(DISTINCT" in sql:
            continue   # the 40-50 ms query: its ratio is near 1 and says little here
        guard.query(sql, user=ANALYST)
        snap = guard.snapshots.current()
        catalog = guard._catalog("analyst", snap)
        boundary = guard.plans.plan(sql, user=ANALYST, role="analyst", snapshot=snap.id,
                                    catalog=catalog).boundaries[0]
        raw.execute(f"PREPARE bench_raw AS {sql}")
        raw.execute("PREPARE bench_cells AS "
                    f"{cells_sql(boundary, person_unique=one_row_per_contributor(boundary, snap, catalog))}")
        times: dict[str, list[float]] = collections.defaultdict(list)
        per_step: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(args.repeat):
            for label, statement in (("raw, prepared", "bench_raw"), ("cells SQL, prepared", "bench_cells")):
                t0 = time.perf_counter()
                raw.execute(f"EXECUTE {statement}").to_arrow_table(ARROW_BATCH_ROWS)
                times[label].append(time.perf_counter() - t0)
            for label, fn in (("guarded", protect), ("protection as a pass-through", pass_through)):
                protection.protect_threshold = fn
                t0 = time.perf_counter()
                raw.execute(sql).to_arrow_table()
                times["raw"].append(time.perf_counter() - t0)
                spent.clear()
                t0 = time.perf_counter()
                guard.query(sql, user=ANALYST)
                times[label].append(time.perf_counter() - t0)
                if fn is protect:
                    for step, seconds in spent.items():
                        per_step[step].append(seconds)
                guard.flush()   # the after-answer work is not charged to the next raw run
        protection.protect_threshold = protect
        raw_ms = statistics.median(times["raw"]) * 1000
        print(f"-- {sql}")
        raw.execute("DEALLOCATE bench_raw")
        raw.execute("DEALLOCATE bench_cells")
        for label in ("raw", "raw, prepared", "cells SQL, prepared", "guarded", "protection as a pass-through"):
            ms = statistics.median(times[label]) * 1000
            print(f"{label:30s} {ms:8.2f} ms  ratio {ms / raw_ms:5.2f}")
        for step in [*(label for _, _, label in steps(guard)), "protect_threshold"]:
            if step in per_step:
                print(f"    {step:26s} {statistics.median(per_step[step]) * 1000:6.3f} ms")
    guard.close()
    raw.close()


if __name__ == "__main__":
    main()
