"""Time and peak memory of ``sekisho synth`` at several city sizes.

    python benchmarks/synth.py                          # 53,000 / 530,000 / 5,000,000
    python benchmarks/synth.py --sizes 5000 530000      # chosen sizes
    python benchmarks/synth.py --out /big/disk          # where the exports go (5M ≈ 1.5 GB)

Each size runs ``sekisho synth`` in a fresh process (so peak RSS is that run's own). It
prints rows written, wall and CPU seconds, peak RSS, and against the smallest size of the
same run (the baseline) the CPU-time ratio next to the size ratio: linear scaling keeps them
equal (wall time also depends on disk and on other load), and flat memory keeps the RSS
ratio near 1. Targets: 530k in well under a minute; memory that
does not grow with the population.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from sekisho.synth import generate
start = time.monotonic()
manifest = generate(sys.argv[1], population=int(sys.argv[2]), seed=0)
elapsed = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
rows = sum(f["rows"] for f in manifest["files"].values())
print(f"{elapsed:.3f} {usage.ru_utime + usage.ru_stime:.3f} {usage.ru_maxrss / 1024:.1f} {rows}")
"""


def run(size: int, out: Path) -> tuple[float, float, float, int]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(out), str(size)], check=True,
                            capture_output=True, text=True)
    elapsed, cpu, rss, rows = result.stdout.split()
    return float(elapsed), float(cpu), float(rss), int(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[53_000, 530_000, 5_000_000])
    parser.add_argument("--out", type=Path, default=None, help="parent directory for the exports")
    parser.add_argument("--keep", action="store_true", help="keep the exports")
    args = parser.parse_args()
    parent = Path(tempfile.mkdtemp(prefix="synth-bench-", dir=args.out))
    print(f"{'persons':>10} {'rows':>11} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} "
          f"{'size x':>7} {'CPU x':>7} {'RSS x':>6}")
    base = None
    try:
        for size in sorted(args.sizes):
            out = parent / f"city-{size}"
            elapsed, cpu, rss, rows = run(size, out)
            base = base or (size, cpu, rss)
            print(f"{size:>10,d} {rows:>11,d} {elapsed:>7.1f} {cpu:>7.1f} {rss:>12.0f} "
                  f"{size / base[0]:>7.1f} {cpu / base[1]:>7.1f} {rss / base[2]:>6.2f}", flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
        else:
            print(f"exports kept in {parent}")


if __name__ == "__main__":
    main()
