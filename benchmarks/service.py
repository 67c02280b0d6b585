"""Guard service speed: a client through the HTTP service vs the in-process guard, and
many concurrent analysts.

    /opt/sekisho/venv/bin/python benchmarks/service.py [--population 20000] [--clients 20]
        [--queries 100] [--repeat 60] [--home EXISTING_INSTANCE]

Builds a synthetic city with the real pipeline (``sekisho synth`` + ``sekisho ingest``)
under /var/tmp unless ``--home`` is given, runs the guard service as its own process
(``python -m sekisho.services.guard``, as the hub would; tokens are checked by the real
HubOAuth client against a stand-in for the hub's ``/hub/api/user``), and prints:

* median latency of a typical grouped query: in-process ``Guard.query``, the ibis client
  in-process (reports' mode) and the ibis client through the service; the ratio
  service / in-process guard (target <= 1.5);
* N concurrent clients x M queries each through the service: errors, p50/p95 latency,
  throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the hub API stand-in and the service runner

TYPICAL = "SELECT block, sex, count(*) AS n FROM residents WHERE is_current GROUP BY block, sex"
MIX = [
    TYPICAL,
    "SELECT age_band, count(*) AS n FROM residents WHERE is_current GROUP BY age_band",
    "SELECT block, count(*) AS n FROM residents WHERE is_current AND age >= 65 GROUP BY block",
    "SELECT idou_type, idou_year, count(*) AS n FROM movements GROUP BY idou_type, idou_year",
    "SELECT cert_type, block, count(*) AS n FROM childcare GROUP BY cert_type, block",
    "SELECT sex, age_band, count(*) AS n FROM residents WHERE is_current GROUP BY sex, age_band",
]


def sekisho(*args: str, home: Path) -> None:
    cmd = [str(Path(sys.prefix) / "bin" / "sekisho"), *args]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, SEKISHO_HOME=str(home)))


def build_instance(population: int) -> Path:
    from sekisho.instance import Instance
    from sekisho.state import set_role

    base = Path(tempfile.mkdtemp(prefix="sekisho-bench-", dir="/var/tmp"))
    os.chmod(base, 0o711)  # the service account reaches its instance through it
    home = base / "home"
    inst = Instance.create(home)
    set_role(inst, "bench-steward", "steward")
    source = base / "source"
    t = time.perf_counter()
    sekisho("synth", "--population", str(population), "--out", str(source), "--seed", "7", "--quiet",
            home=home)
    sekisho("ingest", str(source), "--as", "bench-steward", "--quiet", "--home", str(home), home=home)
    print(f"built a city of {population} residents in {time.perf_counter() - t:.1f}s at {home}")
    return home


def interleaved_medians_ms(variants: dict[str, object], repeat: int) -> dict[str, float]:
    """Median time of each variant, run in rotating order round after round so that load
    from elsewhere on the machine affects every variant alike."""
    names = list(variants)
    for name in names:
        variants[name]()  # warm: plan caches, connections
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()

    import ibis

    from client_fixtures import GUARD_SCOPE, HubApiDouble, ServiceProcess
    from sekisho.client.transport import HttpTransport
    from sekisho.guard import Guard
    from sekisho.instance import Instance
    from sekisho.state import set_role

    home = args.home or build_instance(args.population)
    inst = Instance.open(home)
    hub = HubApiDouble().start()
    users = [f"bench-ana-{i:02d}" for i in range(max(args.clients, 1))]
    for name in users:
        set_role(inst, name, "analyst")
        hub.add_token(f"tok-bench-{name}", name, [GUARD_SCOPE])
    service = ServiceProcess(home, hub.api_url).start(timeout=120)
    try:
        # ---- latency: one client, one typical query ------------------------------------
        guard = Guard(inst)
        local = ibis.sekisho.connect(home=home, user=users[0])
        remote = ibis.sekisho.connect(url=service.url, token=f"tok-bench-{users[0]}")
        medians = interleaved_medians_ms({
            "direct": lambda: guard.query(TYPICAL, user=users[0]),
            "local": lambda: local.sql(TYPICAL).execute(),
            "remote": lambda: remote.sql(TYPICAL).execute(),
        }, args.repeat)
        direct, local_ms, remote_ms = medians["direct"], medians["local"], medians["remote"]
        print(f"typical grouped query ({args.repeat} interleaved runs each, median):")
        print(f"  in-process Guard.query          {direct:8.1f} ms")
        print(f"  ibis client, in-process guard   {local_ms:8.1f} ms")
        print(f"  ibis client through the service {remote_ms:8.1f} ms")
        print(f"  median ratio service/in-process guard: {remote_ms / direct:.2f}x (target <= 1.5x)")

        # ---- load: N concurrent clients x M queries ------------------------------------
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        start_gate = threading.Barrier(args.clients)

        def client(i: int) -> None:
            transport = HttpTransport(service.url, f"tok-bench-{users[i]}")
            start_gate.wait()
            for n in range(args.queries):
                sql = MIX[(i + n) % len(MIX)]
                t = time.perf_counter()
                try:
                    transport.query(sql, mode=None, epsilon=None)
                except Exception as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t) * 1000)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        total = args.clients * args.queries
        print(f"{args.clients} concurrent clients x {args.queries} queries = {total}:")
        print(f"  errors {len(errors)}; p50 {percentile(latencies, 0.50):.1f} ms, "
              f"p95 {percentile(latencies, 0.95):.1f} ms; {total / wall:.1f} queries/s over {wall:.1f}s")
        for e in errors[:5]:
            print("  error:", e)
        verify = inst.audit.verify()
        print(f"  audit chain after the load: {'ok' if verify.ok else 'BROKEN'} ({verify.entries} entries)")
    finally:
        service.stop()
        hub.stop()
        if args.home is None:
            shutil.rmtree(Path(home).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
