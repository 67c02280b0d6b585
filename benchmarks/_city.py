"""Shared setup for the guard benchmarks: a synthetic city ingested into an instance."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sekisho.instance import Instance
from sekisho.state import set_role

ANALYST = "bench_analyst"


def city_instance(home: Path | None, persons: int, seed: int = 1, work: Path | None = None) -> Instance:
    """Open ``home`` if it holds an ingested instance, else synthesise ``persons`` residents
    (``sekisho.synth``) and ingest them (``sekisho.ingest``) into a new instance there."""
    from sekisho.store import Store

    if home is not None and (home / "config.yaml").exists():
        inst = Instance.open(home)
        if Store(inst).current_id() is not None:
            set_role(inst, ANALYST, "analyst")
            return inst
    from sekisho.ingest import ingest
    from sekisho.synth import generate

    work = work or (home.parent if home is not None else Path(tempfile.mkdtemp(prefix="sekisho-bench-", dir="/var/tmp")))
    home = home or work / "home"
    src = work / f"src-{persons}-{seed}"
    t0 = time.perf_counter()
    if not (src / "residents.csv").exists():
        generate(src, population=persons, seed=seed)
    print(f"synth: {persons} persons in {time.perf_counter() - t0:.1f}s -> {src}", flush=True)
    inst = Instance.create(home, exist_ok=True)
    set_role(inst, "bench_steward", "steward")
    set_role(inst, ANALYST, "analyst")
    t0 = time.perf_counter()
    ingest(inst, src, user="bench_steward")
    print(f"ingest: {time.perf_counter() - t0:.1f}s -> {home}", flush=True)
    return inst


def snapshot_path(inst: Instance) -> Path:
    from sekisho.store import Store

    store = Store(inst)
    return store.snapshots_dir / store.current_id() / "data.duckdb"


def analyst_kernels(inst: Instance, scratch: Path) -> None:
    """Set this process's environment so that report notebooks run in fresh kernels (under
    ``scratch``) whose in-process guard serves ``ANALYST`` on ``inst``."""
    import os

    env = {"SEKISHO_HOME": str(inst.home), "SEKISHO_REPORTS_USER": ANALYST,
           "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"), "IPYTHONDIR": str(scratch / "ipython"),
           "MPLCONFIGDIR": str(scratch / "mpl"), "JUPYTER_PLATFORM_DIRS": "1",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    for key in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)


def resume_held(home: Path, users: list[str]) -> int:
    """Lift the guard's holds on the benchmark's users (``sekisho users resume``, audited as
    an admin's action): the same distinct queries of an earlier run on this instance can
    have paused them, and a paused user's queries would all be refused. Returns how many."""
    import contextlib
    import io

    from sekisho.cli.users import resume

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for name in users:
            resume.main(["--home", str(home), name], standalone_mode=False)
    return out.getvalue().count(" resumed (")
