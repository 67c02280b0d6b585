"""The seven report notebooks run as an *analyst* (condition influence on), as an analyst
would run them in their own kernel, on the 530k city.

The published reports run as the identity ``reports`` (no condition influence); an
analyst who opens a notebook in JupyterLab runs the same queries under their own role.
Each notebook is executed with papermill in a fresh kernel whose in-process guard serves
the analyst (``SEKISHO_REPORTS_USER``), so the kernel's memory is the guard's. Prints per
notebook: wall time, the kernel's peak RSS (polled every 0.1 s), and the outcome; then
the total. Target (issue 17): each notebook <= 60 s at 530k.

    python benchmarks/notebooks_as_analyst.py [--home DIR] [--persons 530495] [--only 06]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, analyst_kernels, city_instance  # noqa: E402

from sekisho.reports.catalog import notebooks  # noqa: E402
from sekisho.reports.periods import add_months  # noqa: E402
from sekisho.reports.publish import render_one, resolve_base_month  # noqa: E402
from sekisho.store import Store  # noqa: E402


class PeakRSS:
    """Largest resident set of this process's descendants while running."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--only", default="", help="run only notebooks whose name starts with this")
    args = ap.parse_args()
    inst = city_instance(args.home, args.persons)
    scratch = Path(tempfile.mkdtemp(prefix="sekisho-nb-analyst-", dir="/var/tmp"))
    analyst_kernels(inst, scratch)
    base = resolve_base_month(inst, Store(inst).current())
    parameters = {"base_month": base, "compare_month": add_months(base, -12), "period": 5,
                  "area_level": "地域ブロック"}
    print(f"-- as analyst {ANALYST} (condition influence on), base month {base}", flush=True)
    total, worst = 0.0, 0
    try:
        for nb in notebooks():
            if not nb.name.startswith(args.only):
                continue
            with PeakRSS() as rss:
                outcome = render_one(nb, parameters, scratch / nb.name, meta=[])
            total += outcome.seconds
            worst = max(worst, rss.peak)
            status = "ok" if outcome.ok else f"FAILED: {outcome.error.splitlines()[-1][:160] if outcome.error else ''}"
            print(f"{nb.name:12s} {outcome.seconds:7.1f} s   kernel peak RSS {rss.peak / 2 ** 20:7.0f} MiB   {status}",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"total        {total:7.1f} s   largest kernel peak RSS {worst / 2 ** 20:7.0f} MiB")


if __name__ == "__main__":
    main()
