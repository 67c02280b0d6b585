"""Wall time to publish the whole report suite (7 notebooks, 37 items).

    python benchmarks/reports.py --home /var/lib/sekisho      # an instance with data
    python benchmarks/reports.py                              # builds the default 530k city

Without --home it synthesises the default city (``sekisho synth``), initialises an
instance and ingests it (times printed too). It then publishes with 2 workers and prints
the wall time, each notebook's own time, and their sum (what one worker would need) as
the baseline of the same run. Target on the 2-core machine: <= 60 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEKISHO = [sys.executable, "-m", "sekisho.cli"]


def run(*args: str) -> float:
    start = time.monotonic()
    subprocess.run([*SEKISHO, *args], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def build_city(root: Path) -> Path:
    from sekisho.instance import Instance
    from sekisho.state import set_role

    root.chmod(0o755)  # the service account must reach the instance inside it
    exports, home = root / "exports", root / "home"
    print(f"synth (default city)       {run('synth', '--out', str(exports), '--quiet'):7.1f} s")
    print(f"init                       {run('init', '--home', str(home)):7.1f} s")
    set_role(Instance.open(home), "bench-steward", "steward")
    print(f"ingest                     "
          f"{run('ingest', '--home', str(home), '--as', 'bench-steward', '--quiet', str(exports)):7.1f} s")
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="existing instance with ingested data")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from sekisho.instance import Instance
    from sekisho.reports.catalog import notebooks
    from sekisho.reports.publish import publish

    home = args.home or build_city(Path(tempfile.mkdtemp(prefix="sekisho-bench-")))
    instance = Instance.open(home)
    from sekisho.store import Store
    snap = Store(instance).current()
    print(f"instance {home}, snapshot {snap.id}, residents {snap.tables.get('residents')}")

    start = time.monotonic()
    outcomes = publish(instance, notebooks(), caller="benchmark", caller_role=None,
                       workers=args.workers)
    wall = time.monotonic() - start
    for o in outcomes:
        print(f"  {o.name:<14} {'ok' if o.ok else 'FAILED'} {o.seconds:6.1f} s  {o.error[:100]}")
    serial = sum(o.seconds for o in outcomes)
    print(f"publish wall time ({args.workers} workers): {wall:.1f} s   "
          f"(sum of notebook times = 1-worker baseline {serial:.1f} s; speed-up {serial / wall:.2f}x; "
          f"target <= 60 s: {'met' if wall <= 60 else 'NOT met'})")
    if any(not o.ok for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
