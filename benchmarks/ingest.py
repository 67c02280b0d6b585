"""Ingest speed: synthesise a city (``sekisho.synth``) and time ``sekisho ingest`` on it.

    /opt/sekisho/venv/bin/python benchmarks/ingest.py                 # 530k and 5M residents
    /opt/sekisho/venv/bin/python benchmarks/ingest.py --sizes 530000  # just Himeji's size

For each size it prints source rows, wall seconds, CPU seconds, rows/s and the peak RSS
of the ingest process (each ingest runs in its own child process, timed from the parent,
so the synthesis does not count), and at the end the 5M/530k time ratio against the
linear expectation (5,000,000 / 530,000 = 9.4x). The target is <= 30 s at 530k on the
2-core reference machine. Wall time on a shared machine is noisy: CPU time is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from sekisho.instance import Instance
from sekisho.state import set_role
from sekisho.ingest import ingest
home, src = sys.argv[1], sys.argv[2]
inst = Instance.create(home)
set_role(inst, "bench", "steward")
t = time.monotonic()
r = ingest(inst, src, user="bench", progress=True)
print(json.dumps({"seconds": time.monotonic() - t, "tables": r.tables, "phases": r.timings,
                  "rows": sum(f["rows"] for f in r.files)}))
"""


def synthesise(population: int, out: Path, seed: int) -> float:
    from sekisho.synth import generate

    t = time.monotonic()
    generate(out, population=population, seed=seed)
    return time.monotonic() - t


def run_ingest(src: Path, work: Path) -> dict:
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(home), str(src)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t
    if status != 0:
        raise SystemExit(f"ingest failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process_wall=wall, cpu=usage.ru_utime + usage.ru_stime,
                  peak_rss_mb=usage.ru_maxrss / 1024)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="530000,5000000",
                    help="comma-separated resident counts (default: 530000,5000000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where exports and instances go (default: a temp dir, removed after)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for n in sizes:
            src = work / f"export-{n}"
            if not (src / "manifest.json").exists():
                print(f"synthesising {n:,} residents ...", file=sys.stderr, flush=True)
                synth_s = synthesise(n, src, args.seed)
                print(f"  synthesised in {synth_s:.1f} s", file=sys.stderr, flush=True)
            r = run_ingest(src, work)
            results[n] = r
            print(f"{n:>10,} residents: {r['rows']:>11,} source rows  ingest {r['seconds']:7.2f} s "
                  f"(process {r['process_wall']:6.2f} s, cpu {r['cpu']:6.2f} s)  "
                  f"{r['rows'] / r['seconds']:>10,.0f} rows/s  peak RSS {r['peak_rss_mb']:,.0f} MB",
                  flush=True)
            print("    phases (wall s / cpu s): " + ", ".join(
                f"{k} {v:.1f}/{r['phases'].get(k + '_cpu', 0):.1f}"
                for k, v in r["phases"].items() if not k.endswith("_cpu")), flush=True)
        if 530000 in results:
            s = results[530000]["seconds"]
            print(f"target: 530k residents in <= 30 s: {'met' if s <= 30 else 'NOT met'} ({s:.1f} s)")
        if 530000 in results and 5000000 in results:
            a, b = results[530000], results[5000000]
            linear = 5000000 / 530000
            print(f"5M / 530k: time x{b['seconds'] / a['seconds']:.2f} "
                  f"(cpu x{b['cpu'] / a['cpu']:.2f}, rows x{b['rows'] / a['rows']:.2f}) "
                  f"vs linear expectation x{linear:.1f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
