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

Cold queries (``--cold N``, the distinct new queries of guard_overhead.py, each run once
on a new guard, as analysts type them): where a query's first run goes — planning
(parse, analysis passes, rewrite), condition influence (its neighbours' preparation in
Python and its counting scan in DuckDB), the cells scan, the protected schema, the
one-off check per view (one row per person?), protection, post-processing, recording —
as medians over the queries, the engine's share apart; then the cold ratio of the same
queries on a guard whose policy has condition influence off (measurement only: what the
rule's own scan costs a new query). Each query's first run is repeated as ``--cold-runs``
new users (users ``bench_analyst_cold<i>_q<j>``, one per query and run; a plan, verdict or prepared statement is per
user, so each is a first run): their minimum shows the work without the noise of a busy
machine, beside the benchmark's single first run.

    python benchmarks/guard_overhead_breakdown.py [--home DIR] [--repeat 40] [--cold 24]
        [--cold-runs 5] [--no-warm]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, city_instance, resume_held, snapshot_path  # noqa: E402
from guard_overhead import QUERIES, cold_queries  # noqa: E402

import sekisho.guard.execution as execution  # noqa: E402
import sekisho.guard.influence as influence  # noqa: E402
import sekisho.guard.planning as planning  # noqa: E402
import sekisho.guard.protection as protection  # noqa: E402
import sekisho.guard.session as session  # noqa: E402
from sekisho.guard import Guard  # noqa: E402
from sekisho.guard.cells import cells_sql  # noqa: E402
from sekisho.guard.protect.threshold import ProtectionStats, counted  # noqa: E402

from sekisho.guard.execution import ARROW_BATCH_ROWS  # noqa: E402
from sekisho.guard.protection import one_row_per_contributor  # noqa: E402
from sekisho.state import set_role  # noqa: E402


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


COLD_STEPS = ("planning", "influence: neighbours (Python)", "influence: scan (DuckDB)", "cells scan (DuckDB)",
              "protected schema (DuckDB LIMIT 0)", "view check, once per view (DuckDB)", "protection",
              "post-processing", "recording", "rest")


@contextlib.contextmanager
def cold_instrumented(guard: Guard, spent: dict):
    """Time a cold query's stages (see COLD_STEPS); the originals are put back after."""
    inside_influence = [False]
    patches = []

    def patch(owner, attribute, wrapper):
        original = getattr(owner, attribute)
        patches.append((owner, attribute, original))
        setattr(owner, attribute, wrapper(original))

    def timed(label):
        def wrapper(fn):
            def call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[label] += time.perf_counter() - t0
            return call
        return wrapper

    def fetch_wrapper(fn):
        def call(*args, **kwargs):
            label = "influence: scan (DuckDB)" if inside_influence[0] else "cells scan (DuckDB)"
            return timed(label)(fn)(*args, **kwargs)
        return call

    def decide_wrapper(fn):
        def call(*args, **kwargs):
            inside_influence[0] = True
            t0 = time.perf_counter()
            scans = spent["influence: scan (DuckDB)"]
            try:
                return fn(*args, **kwargs)
            finally:
                inside_influence[0] = False
                spent["influence: neighbours (Python)"] += (time.perf_counter() - t0) - \
                    (spent["influence: scan (DuckDB)"] - scans)
        return call

    patch(planning, "make_plan", timed("planning"))
    patch(protection, "fetch", fetch_wrapper)
    patch(influence, "decide", decide_wrapper)
    patch(execution, "protected_schema", timed("protected schema (DuckDB LIMIT 0)"))
    patch(execution.Snapshot, "is_person_unique", timed("view check, once per view (DuckDB)"))
    # ... and one row per declared row identity (resident_tax per tax year), once per snapshot
    patch(protection, "unique_in_store", timed("view check, once per view (DuckDB)"))
    patch(protection, "protect_threshold", timed("protection"))
    patch(guard.post, "run", timed("post-processing"))
    patch(guard.recorder, "announce", timed("recording"))
    patch(guard.recorder, "answered", timed("recording"))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(patches):
            setattr(owner, attribute, original)


def cold(inst, count: int, reps: int) -> None:
    """Where a new query's first run goes (module docstring). Each query runs ``reps``
    times, each time as a user who has not asked it (the plan cache, verdicts and
    prepared statements are per user, so every run is a first run): the first run is
    the benchmark's; the minimum over the runs is what the work costs on a machine that
    is otherwise busy (other processes only ever add time)."""
    queries = cold_queries(count)
    users = [ANALYST] + [f"{ANALYST}_cold{r}" for r in range(1, reps)]
    for run in users:
        for i in range(len(queries)):
            set_role(inst, f"{run}_q{i}", "analyst")
    resume_held(inst.home, [f"{run}_q{i}" for run in users for i in range(len(queries))])
    raw = duckdb.connect(str(snapshot_path(inst)), read_only=True)
    for view in ("residents", "resident_tax", "movements"):   # the data in DuckDB's buffers, untimed
        raw.execute(f'SELECT * FROM "{view}"').to_arrow_table()

    def series(guard: Guard) -> tuple[list[list[float]], list[list[float]], list[list[dict]]]:
        """[query][run] raw and guarded times and step times."""
        guard.snapshots.current()
        raws = [[] for _ in queries]
        totals = [[] for _ in queries]
        steps = [[] for _ in queries]
        for run in users:
            for i, sql in enumerate(queries):
                # a user per query and run: an analyst's same-shaped queries can pause them
                # (``cell_pairs``), and a plan is per user, so each is still a first run
                user = f"{run}_q{i}"
                raws[i].append(timed_run(lambda: raw.execute(sql).to_arrow_table()))
                spent: dict[str, float] = collections.defaultdict(float)
                with cold_instrumented(guard, spent):
                    totals[i].append(timed_run(lambda: guard.query(sql, user=user)))
                guard.flush()
                spent["rest"] = totals[i][-1] - sum(spent.values())
                steps[i].append(spent)
        guard.close()
        return raws, totals, steps

    guard = Guard(inst)
    policy = guard.policy
    raws, totals, steps = series(guard)
    first = statistics.median(t[0] / r[0] for t, r in zip(totals, raws))
    best = statistics.median(min(t) / min(r) for t, r in zip(totals, raws))
    print(f"-- cold: first run of {len(queries)} distinct new queries (medians over the queries); "
          f"right: the minimum of {len(users)} first runs (new users)")
    print(f"{'raw DuckDB':40s} {statistics.median(r[0] for r in raws) * 1000:8.2f} ms   "
          f"{statistics.median(min(r) for r in raws) * 1000:8.2f} ms")
    print(f"{'guarded':40s} {statistics.median(t[0] for t in totals) * 1000:8.2f} ms   "
          f"{statistics.median(min(t) for t in totals) * 1000:8.2f} ms   ratio {first:5.2f} / {best:5.2f}")
    for step in COLD_STEPS:
        print(f"    {step:36s} {statistics.median(s[0].get(step, 0.0) for s in steps) * 1000:8.2f} ms   "
              f"{statistics.median(min(run.get(step, 0.0) for run in s) for s in steps) * 1000:8.2f} ms")
    engine = [[sum(v for k, v in run.items() if "DuckDB" in k) for run in s] for s in steps]
    python = [[t - e for t, e in zip(ts, es)] for ts, es in zip(totals, engine)]
    print(f"    {'engine (the DuckDB steps above)':36s} {statistics.median(e[0] for e in engine) * 1000:8.2f} ms   "
          f"{statistics.median(min(e) for e in engine) * 1000:8.2f} ms")
    print(f"    {'python and the rest':36s} {statistics.median(p[0] for p in python) * 1000:8.2f} ms   "
          f"{statistics.median(min(p) for p in python) * 1000:8.2f} ms")
    # lower bound: the same queries on a new guard whose policy has condition influence off
    off = dataclasses.replace(policy, disclosure=dataclasses.replace(policy.disclosure, condition_influence=False))
    raws, totals, _ = series(Guard(inst, policy=off))
    raw.close()
    print(f"cold median ratio guarded/raw {first:.2f} (minimum of {len(users)} first runs: {best:.2f}); "
          f"with condition influence off (measurement only) "
          f"{statistics.median(t[0] / r[0] for t, r in zip(totals, raws)):.2f} "
          f"({statistics.median(min(t) / min(r) for t, r in zip(totals, raws)):.2f})")


def timed_run(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--cold", type=int, default=24, help="distinct new queries for the cold breakdown (0: skip)")
    ap.add_argument("--cold-runs", type=int, default=5, help="first runs of each cold query, as new users")
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                    help="the warm breakdown of the guard_overhead queries")
    args = ap.parse_args()
    inst = city_instance(args.home, args.persons)
    if args.cold:
        cold(inst, args.cold, max(args.cold_runs, 1))
    if not args.warm:
        return
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
