"""Where a report notebook's time goes when an analyst runs it (a diagnostic beside
notebooks_as_analyst.py), and a fingerprint of its answers.

The notebook's code cells run in this process (no kernel, no papermill), with the same
parameters as ``notebooks_as_analyst.py``; its queries reach an in-process guard as the
analyst (``SEKISHO_REPORTS_USER``), condition influence on. Every ``Guard.query`` is
timed, split into condition influence (rounds, its counting scans in DuckDB, the rest in
Python) and the remainder. Prints one line per query, the slowest first, and the totals.

``--fingerprint FILE`` writes each query's answer (the released table's rows, or the
refusal code, and the conditions left out) as JSON; ``--compare FILE`` checks the
answers against such a file and prints the differences (exit status 1 if any): answers
before and after a change to the guard must be identical.

    python benchmarks/notebook_profile.py [--home DIR] [--only 06] [--fingerprint F] [--compare F]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, city_instance  # noqa: E402

import sekisho.guard.influence as influence  # noqa: E402
import sekisho.guard.protection as protection  # noqa: E402
from sekisho.guard import Guard, QueryRefused  # noqa: E402
from sekisho.reports.catalog import notebooks  # noqa: E402
from sekisho.reports.periods import add_months  # noqa: E402
from sekisho.reports.publish import resolve_base_month  # noqa: E402
from sekisho.store import Store  # noqa: E402


def answer_of(result) -> dict:
    """A query's answer as comparable data (rows sorted; floats as repr)."""
    table = result.table
    rows = sorted(json.dumps([repr(v) for v in row.values()], ensure_ascii=False) for row in table.to_pylist())
    return {"columns": table.column_names, "rows": rows,
            "left_out": list(result.summary.get("conditions_left_out") or result.summary.get("left_out") or [])}


def instrument(records: list[dict]) -> None:
    """Time every Guard.query and its condition-influence work."""
    original_query, original_decide, original_fetch = Guard.query, influence.decide, protection.fetch
    state = {"inside": False, "current": None}

    def fetch(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_fetch(*args, **kwargs)
        finally:
            rec = state["current"]
            if rec is not None:
                key = "influence_scan" if state["inside"] else "other_scan"
                rec[key] += time.perf_counter() - t0
                if state["inside"]:
                    rec["rounds"] += 1

    def decide(*args, **kwargs):
        state["inside"] = True
        t0 = time.perf_counter()
        try:
            return original_decide(*args, **kwargs)
        finally:
            state["inside"] = False
            rec = state["current"]
            if rec is not None:
                rec["influence"] += time.perf_counter() - t0

    def query(self, sql, **kwargs):
        rec = collections.defaultdict(float, sql=sql, rounds=0)
        state["current"] = rec
        t0 = time.perf_counter()
        try:
            result = original_query(self, sql, **kwargs)
            rec["answer"] = answer_of(result)
            return result
        except QueryRefused as refused:
            rec["answer"] = {"refused": refused.code}
            raise
        finally:
            rec["total"] = time.perf_counter() - t0
            state["current"] = None
            records.append(rec)

    Guard.query = query
    influence.decide = decide
    protection.fetch = fetch


def run_notebook(path: Path, parameters: dict) -> None:
    nb = json.loads(path.read_text())
    scope: dict = {"__name__": "__notebook__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        if "parameters" in cell.get("metadata", {}).get("tags", []) or i == 0:
            exec(compile(source, f"{path.name}[{i}]", "exec"), scope)
            scope.update(parameters)
            continue
        exec(compile(source, f"{path.name}[{i}]", "exec"), scope)


def digest(answer: dict) -> str:
    return hashlib.sha256(json.dumps(answer, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--only", default="06")
    ap.add_argument("--fingerprint", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None)
    args = ap.parse_args()
    inst = city_instance(args.home, args.persons)
    os.environ.update({"SEKISHO_HOME": str(inst.home), "SEKISHO_REPORTS_USER": ANALYST,
                       "MPLCONFIGDIR": tempfile.mkdtemp(prefix="sekisho-nbprof-", dir="/var/tmp")})
    from sekisho.cli.users import resume
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        resume.main(["--home", str(inst.home), ANALYST], standalone_mode=False)
    base = resolve_base_month(inst, Store(inst).current())
    parameters = {"base_month": base, "compare_month": add_months(base, -12), "period": 5,
                  "area_level": "地域ブロック", "tables_dir": None}
    records: list[dict] = []
    instrument(records)
    chosen = [nb for nb in notebooks() if nb.name.startswith(args.only)]
    proc = psutil.Process()
    for nb in chosen:
        records.clear()
        t0 = time.perf_counter()
        run_notebook(nb.path, parameters)
        wall = time.perf_counter() - t0
        print(f"-- {nb.name}: {wall:.1f} s wall, {len(records)} guard queries, "
              f"peak RSS {proc.memory_info().rss / 2 ** 20:.0f} MiB (now)", flush=True)
        print(f"{'total':>7s} {'infl':>7s} {'scan':>7s} {'rnds':>4s} {'other':>7s}  answer            sql")
        for rec in sorted(records, key=lambda r: -r["total"]):
            print(f"{rec['total']:7.2f} {rec['influence']:7.2f} {rec['influence_scan']:7.2f} {rec['rounds']:4d} "
                  f"{rec['other_scan']:7.2f}  {digest(rec['answer'])}  {rec['sql'][:110]}")
        print(f"sum: total {sum(r['total'] for r in records):.1f} s, influence {sum(r['influence'] for r in records):.1f} s "
              f"(scans {sum(r['influence_scan'] for r in records):.1f} s), cells scans "
              f"{sum(r['other_scan'] for r in records):.1f} s", flush=True)
    answers = [{"sql": r["sql"], "answer": r["answer"]} for r in records]
    if args.fingerprint:
        args.fingerprint.write_text(json.dumps(answers, ensure_ascii=False, indent=1))
        print(f"fingerprint of {len(answers)} answers -> {args.fingerprint}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        diffs = [(i, b["sql"][:100]) for i, (b, a) in enumerate(zip(before, answers)) if b != a]
        if len(before) != len(answers):
            diffs.append((-1, f"{len(before)} answers before, {len(answers)} now"))
        for i, sql in diffs:
            print(f"DIFFERENT answer #{i}: {sql}")
        print(f"compare: {len(answers)} answers, {len(diffs)} different")
        if diffs:
            sys.exit(1)


if __name__ == "__main__":
    main()
