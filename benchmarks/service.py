"""Guard service speed: the ibis client through the HTTP service vs the in-process guard,
and many concurrent analysts through the service and in-process, in the same run.

    /opt/sekisho/venv/bin/python benchmarks/service.py --home /var/tmp/guardbench/home
        [--persons 530495] [--clients 20] [--queries 100] [--repeat 60] [--users 20] [--rounds 2]

Opens the instance at ``--home`` (a city ingested by ``benchmarks/_city.py``; built there
if it holds none), registers ``--users`` analysts ``bench_analyst_00..`` and runs the guard
service as its own process (``python -m sekisho.services.guard``, as the hub would; tokens
are checked by the real HubOAuth client against a stand-in for the hub's
``/hub/api/user``). **Every request is distinct**: the queries are drawn from a few
typical families (grouped counts with a WHERE of two or three conditions) with literals
that never repeat in the run, so nothing is answered from a plan, verdict or prepared
statement cache — what analysts typing new queries get. Prints, last:

(a) the ibis client through the service (``con.sql(sql).execute()``: a ``describe`` and a
    ``query`` request) vs ``Guard.query`` in-process on the same queries (each new to both
    guards), adjacent in alternating order, each guard's work after the answer waited for
    (untimed) before the next pair; the ratio of the medians and the median of the
    per-query ratios (target <= 1.3);
(b) ``--clients`` threads x ``--queries`` queries, one analyst per thread (so per-user
    admission does not serialise them), through the service (``HttpTransport``) and
    in-process (one shared ``Guard``), in phases S I I S (``--rounds 2``) so that load from
    elsewhere on the machine weighs on both alike: p50, p95, queries/s, CPU-seconds per
    query of the guard (the service process; in-process: the whole benchmark process) and
    of the load generator (targets: service throughput >= 70% of in-process, service p95
    <= 1.5x in-process p95);
(c) the guard service's RSS before and after.

The guard's resource limits in force (``config.yaml`` section ``guard``) are printed first.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the hub API stand-in and the service runner
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCKS = ['安富', '家島', '広畑', '香寺', '飾磨', '西部', '中部第一', '中部第二', '東部', '灘', '北部', '夢前', '網干']


def _family(n: int) -> str:
    """Query ``n`` of the run: family ``n % 6``, literals from ``n // 6`` — distinct for
    every ``n`` below 6 x 3,000."""
    f, k = n % 6, n // 6
    a = k % 75                       # 0..74
    w = 5 + (k // 75) % 40           # 5..44: (a, w) distinct for k < 3,000
    b = a + w
    blk = BLOCKS[k % len(BLOCKS)]
    if f == 0:
        return (f"SELECT block, sex, count(*) AS n FROM residents "
                f"WHERE is_current AND age >= {a} AND age < {b} GROUP BY block, sex")
    if f == 1:
        return (f"SELECT age_band, count(*) AS n FROM residents "
                f"WHERE is_current AND age BETWEEN {a} AND {b} GROUP BY age_band")
    if f == 2:
        return (f"SELECT idou_type, idou_year, count(*) AS n FROM movements "
                f"WHERE age >= {a} AND age < {b} GROUP BY idou_type, idou_year")
    if f == 3:
        month = f"{2020 + k % 6}-{(k // 6) % 12 + 1:02d}"     # (month, block, age): 5,616 queries
        return (f"SELECT cert_type, facility_type, count(*) AS n FROM childcare WHERE cert_ym >= '{month}' "
                f"AND facility_block <> '{BLOCKS[(k // 72) % 13]}' AND age <= {(k // 936) % 6 + 1} "
                f"GROUP BY cert_type, facility_type")
    if f == 4:
        return (f"SELECT sex, age_band, count(*) AS n FROM residents "
                f"WHERE is_current AND block <> '{blk}' AND age < {b + 10} AND age >= {a} GROUP BY sex, age_band")
    return (f"SELECT block, count(*) AS n FROM residents "
            f"WHERE is_current AND age >= {a} AND age < {b} AND sex = '{'男' if k % 2 else '女'}' GROUP BY block")


class DistinctQueries:
    """A thread-safe source of queries that never repeat within the run."""

    def __init__(self):
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.seen: set[str] = set()

    def next(self) -> str:
        with self._lock:
            while True:
                n = next(self._counter)
                if n >= 6 * 3000:
                    raise RuntimeError("the query families are exhausted: run fewer queries")
                sql = _family(n)
                if sql not in self.seen:
                    self.seen.add(sql)
                    return sql


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(proc: psutil.Process, timeout: float = 2.0) -> None:
    """Until ``proc`` has used (almost) no CPU for 20 ms: its bookkeeping after an answer is done."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        before = cpu_of(proc)
        time.sleep(0.02)
        if cpu_of(proc) - before < 0.002:
            return


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def run_load(clients: int, queries: int, sqls: list[list[str]], one) -> dict[str, object]:
    """``clients`` threads, thread ``i`` running ``one(i, sql)`` over ``sqls[i]``."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        gate.wait()
        for sql in sqls[i][:queries]:
            t = time.perf_counter()
            try:
                one(i, sql)
            except Exception as e:
                code = getattr(e, "code", None) or type(e).__name__
                with lock:
                    errors[str(code)] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/var/tmp/guardbench/home"))
    ap.add_argument("--persons", type=int, default=530495)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=60, help="queries in the one-client latency comparison")
    ap.add_argument("--rounds", type=int, default=2, help="(b): rounds of service + in-process phases")
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()

    import ibis

    from _city import city_instance, resume_held
    from client_fixtures import GUARD_SCOPE, HubApiDouble, ServiceProcess
    from sekisho.access import load_policy_cached
    from sekisho.client.transport import HttpTransport
    from sekisho.guard import Guard
    from sekisho.guard.limits import Limits
    from sekisho.state import set_role

    inst = city_instance(args.home, args.persons)
    home = inst.home
    users = [f"bench_analyst_{i:02d}" for i in range(max(args.users, 1))]
    hub = HubApiDouble().start()
    for name in users:
        set_role(inst, name, "analyst")
        hub.add_token(f"tok-bench-{name}", name, [GUARD_SCOPE])
    resumed = resume_held(home, users)
    limits = Limits.from_config(inst.config)
    policy = load_policy_cached(inst.policy_path)
    print(f"policy: k={policy.disclosure.k}, condition_influence={policy.disclosure.condition_influence}, "
          f"alerts.pause_on={list(policy.disclosure.alerts.pause_on)} ({resumed} benchmark users on hold from "
          f"earlier runs resumed)", flush=True)
    print(f"instance {home}; {len(users)} analyst users {users[0]}..{users[-1]}; guard limits "
          f"(config.yaml guard:): max_running={limits.max_running}, max_running_per_user="
          f"{limits.max_running_per_user}, threads={limits.threads}, memory_limit={limits.memory_limit}, "
          f"query_seconds={limits.query_seconds:g}", flush=True)

    queries = DistinctQueries()
    service = ServiceProcess(home, hub.api_url).start(timeout=180)
    sproc = psutil.Process(service.proc.pid)
    guard = Guard(inst)
    lines: list[str] = []
    try:
        # the service's guard opens its snapshot at its first request; so does this one
        remote = ibis.sekisho.connect(url=service.url, token=f"tok-bench-{users[0]}")
        remote.sql(queries.next()).execute()
        guard.query(queries.next(), user=users[0])
        guard.flush()
        rss_before = rss_mb(sproc)
        print(f"guard service pid {sproc.pid}: RSS {rss_before:.0f} MB after its first query", flush=True)

        # ---- (a) one client: the ibis client through the service vs Guard.query ------------
        # each query through both, adjacent and in alternating order: the per-pair ratio
        # cancels what the rest of the machine does meanwhile
        pairs = [queries.next() for _ in range(args.repeat)]
        times: dict[str, list[float]] = {"service": [], "inprocess": []}
        for i, sql in enumerate(pairs):
            order = ("service", "inprocess") if i % 2 == 0 else ("inprocess", "service")
            for which in order:
                t = time.perf_counter()
                if which == "service":
                    remote.sql(sql).execute()
                else:
                    guard.query(sql, user=users[0])
                times[which].append((time.perf_counter() - t) * 1000)
            # both guards' work after the answer (audit fsync, alert counters, differencing
            # checks on the store) is waited for, untimed, before the next pair
            guard.flush()
            wait_idle(sproc)
        med_s, med_i = statistics.median(times["service"]), statistics.median(times["inprocess"])
        ratios = [a / b for a, b in zip(times["service"], times["inprocess"])]
        lines.append(f"(a) {args.repeat} distinct queries, one client, each through both paths (median): ibis "
                     f"client through the service {med_s:.1f} ms, Guard.query in-process {med_i:.1f} ms; ratio "
                     f"{med_s / med_i:.2f}x, median per-query ratio {statistics.median(ratios):.2f}x (target <= 1.3)")
        print(lines[-1], flush=True)

        # ---- (b) N threads x M queries, through the service and in-process ----------------
        # in rounds S I I S (--rounds 2), each of M/rounds queries per thread, so that a change
        # of the machine's load during the run weighs on both alike
        per_phase = max(1, args.queries // args.rounds)
        order = [("service", "inprocess") if r % 2 == 0 else ("inprocess", "service") for r in range(args.rounds)]
        phases = [p for pair in order for p in pair]
        transports = [HttpTransport(service.url, f"tok-bench-{users[i % len(users)]}") for i in range(args.clients)]
        for tr in transports:
            tr.views()   # connected, token known to the service (as a kernel after connect())
        run_one = {"service": lambda i, sql: transports[i].query(sql, mode=None, epsilon=None),
                   "inprocess": lambda i, sql: guard.query(sql, user=users[i % len(users)])}
        totals = {k: {"latencies": [], "errors": Counter(), "wall": 0.0, "cpu_guard": 0.0, "cpu_gen": 0.0, "n": 0}
                  for k in run_one}
        for phase in phases:
            sqls = [[queries.next() for _ in range(per_phase)] for _ in range(args.clients)]
            guard.flush()
            cpu_s0, cpu_g0 = cpu_of(sproc), self_cpu()
            r = run_load(args.clients, per_phase, sqls, run_one[phase])
            if phase == "inprocess":
                guard.flush()   # its bookkeeping is part of its cost
            cpu_s1, cpu_g1 = cpu_of(sproc), self_cpu()
            t = totals[phase]
            t["latencies"] += r["latencies"]
            t["errors"].update(r["errors"])
            t["wall"] += r["wall"]
            t["n"] += args.clients * per_phase
            if phase == "service":
                t["cpu_guard"] += cpu_s1 - cpu_s0
                t["cpu_gen"] += cpu_g1 - cpu_g0
            else:
                t["cpu_guard"] += cpu_g1 - cpu_g0
            print(f"    phase {phase:<9} {args.clients * per_phase / r['wall']:6.1f} q/s, "
                  f"p95 {percentile(r['latencies'], .95):.0f} ms", flush=True)
        rss_after = rss_mb(sproc)

        def row(name: str, t: dict, same_process: bool) -> str:
            lat, n = t["latencies"], t["n"]
            errs = ", ".join(f"{k} {v}" for k, v in sorted(t["errors"].items())) or "none"
            gen = "(the same process)" if same_process else f"{t['cpu_gen'] / n * 1000:.1f} ms"
            return (f"    {name:<10} p50 {percentile(lat, .5):7.1f} ms  p95 {percentile(lat, .95):7.1f} ms  "
                    f"{n / t['wall']:6.1f} q/s  CPU-seconds/query: guard {t['cpu_guard'] / n * 1000:.1f} ms, "
                    f"load generator {gen}; refused/errors: {errs}")

        s, p = totals["service"], totals["inprocess"]
        qps_s, qps_i = s["n"] / s["wall"], p["n"] / p["wall"]
        p95_s, p95_i = percentile(s["latencies"], .95), percentile(p["latencies"], .95)
        lines.append(f"(b) {args.clients} threads x {per_phase * args.rounds} distinct queries per path "
                     f"({len(users)} users; phases {' '.join('S' if x == 'service' else 'I' for x in phases)}):")
        lines.append(row("service", s, False))
        lines.append(row("in-process", p, True))
        lines.append(f"    throughput service/in-process {qps_s / qps_i:.0%} (target >= 70%); "
                     f"p95 service/in-process {p95_s / p95_i:.2f}x (target <= 1.5x)")
        lines.append(f"(c) guard service RSS: before {rss_before:.0f} MB, after {rss_after:.0f} MB")
        verify = inst.audit.verify()
        lines.append(f"    audit chain after the load: {'ok' if verify.ok else 'BROKEN'} ({verify.entries} entries)")
        print()
        for line in lines:
            print(line)
    finally:
        guard.close()
        service.stop()
        hub.stop()


if __name__ == "__main__":
    main()
