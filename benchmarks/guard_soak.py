"""Soak: many distinct generated analyst queries against the city THROUGH THE GUARD SERVICE,
with the service's memory watched (issue 17, item 5).

    /opt/sekisho/venv/bin/python benchmarks/guard_soak.py --home /var/tmp/guardbench/home
        [--queries 10000] [--clients 4] [--users 100] [--seed 17] [--persons 530495]

Opens the instance at ``--home`` (a city ingested by ``benchmarks/_city.py``; built there
if it holds none), registers ``--users`` analysts ``soak_analyst_000..`` and runs the guard
service as its own process, as ``benchmarks/service.py`` does (``python -m
sekisho.services.guard``; tokens checked by the real HubOAuth client against a stand-in
for the hub's ``/hub/api/user``). ``--clients`` threads then send ``--queries`` distinct
queries (``QueryGenerator``: varied but valid queries of the accepted language — GROUP BY
of dimension columns with domains, WHERE with varying literals, IN lists, CASE bands and
integer bands, COUNT / COUNT(DISTINCT) / conditional counts, SUM/AVG of measures, joins to
public views, household unit scopes, threshold and DP with small ε), each user's queries
from one thread, through ``HttpTransport`` (the ibis client's transport).

Prints progress every 10%, then: answered / refused by code (target: at least half
answered), crashes (service process deaths, ``internal_error`` answers, transport
failures: must be 0), and the service's RSS at start / middle / end and its peak
(targets: end <= 2 GB and within 10% of middle).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the hub API stand-in and the service runner
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCKS = ['安富', '家島', '広畑', '香寺', '飾磨', '西部', '中部第一', '中部第二', '東部', '灘', '北部', '夢前', '網干']
BANDS = ['0-4', '5-9', '10-14', '15-19', '20-24', '25-29', '30-34', '35-39', '40-44', '45-49', '50-54',
         '55-59', '60-64', '65-69', '70-74', '75-79', '80-84', '85-89', '90-94', '95-99', '100+']
RELATIONSHIPS = ['世帯主', '妻', '夫', '子', '父', '母', '孫', '兄弟姉妹', '祖父', '祖母', '子の配偶者', 'その他']
IDOU_TYPES = ['転入', '転出', '転居', '出生', '死亡', '職権記載']
CERT_TYPES = ['1号', '2号', '3号']
FACILITY_TYPES = ['こども園', '公立幼稚園', '保育園', '保育所']


def lit(value) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


def in_list(values) -> str:
    return ", ".join(lit(v) for v in values)


class QueryGenerator:
    """Distinct, varied, valid analyst queries: ``next()`` -> ``(sql, mode, epsilon)``.

    Deterministic for a seed; a query already produced is drawn again (the literals make
    repeats rare), so every query of a run is new to the guard's caches."""

    def __init__(self, seed: int = 17, dp_share: float = 0.2):
        self.rng = random.Random(seed)
        self.dp_share = dp_share
        self.seen: set[str] = set()
        self.families = [
            (self.residents, 24), (self.residents_bands, 12), (self.movements, 14), (self.childcare, 8),
            (self.tax, 10), (self.conditional, 8), (self.join_public, 8), (self.post_join, 4),
            (self.households, 12),
        ]
        self.weights = [w for _, w in self.families]

    def next(self) -> tuple[str, str | None, float | None]:
        while True:
            family = self.rng.choices(self.families, weights=self.weights)[0][0]
            sql, dp_ok = family()
            if sql in self.seen:
                continue
            self.seen.add(sql)
            if dp_ok and self.rng.random() < self.dp_share:
                return sql, "dp", round(self.rng.uniform(0.001, 0.005), 4)
            return sql, None, None

    # ---- conditions -------------------------------------------------------------------------
    def age_condition(self, col: str = "age") -> str:
        r = self.rng
        a = r.randint(0, 90)
        kind = r.randrange(4)
        if kind == 0:
            return f"{col} >= {a}"
        if kind == 1:
            return f"{col} < {max(a, 5)}"
        if kind == 2:
            return f"{col} BETWEEN {a} AND {a + r.randint(4, 40)}"
        return f"{col} >= {a} AND {col} < {a + r.randint(5, 40)}"

    def block_condition(self, col: str = "block") -> str:
        r = self.rng
        kind = r.randrange(3)
        if kind == 0:
            return f"{col} IN ({in_list(r.sample(BLOCKS, r.randint(2, 8)))})"
        if kind == 1:
            return f"{col} <> {lit(r.choice(BLOCKS))}"
        return f"{col} NOT IN ({in_list(r.sample(BLOCKS, r.randint(1, 4)))})"

    def month(self, lo: int = 2015, hi: int = 2026) -> str:
        return f"{self.rng.randint(lo, hi)}-{self.rng.randint(1, 12):02d}"

    def where(self, pool: list, n_min: int = 1, n_max: int = 3) -> str:
        picks = self.rng.sample(pool, self.rng.randint(n_min, min(n_max, len(pool))))
        parts = [p() for p in picks]
        return " WHERE " + " AND ".join(parts) if parts else ""

    # ---- families (each returns (sql, may run in DP mode)) ---------------------------------------
    def residents(self):
        r = self.rng
        keys = r.sample(["block", "sex", "age_band", "relationship", "is_current"], r.randint(1, 2))
        pool = [self.age_condition, self.block_condition, lambda: "is_current",
                lambda: f"sex = {lit(r.choice(['男', '女']))}",
                lambda: f"birth_year >= {r.randint(1930, 2020)}",
                lambda: f"registered_ym >= {lit(self.month(1990, 2026))}",
                lambda: f"relationship IN ({in_list(r.sample(RELATIONSHIPS, r.randint(2, 6)))})",
                lambda: f"age_band IN ({in_list(r.sample(BANDS, r.randint(2, 10)))})"]
        aggs = ["COUNT(*) AS n"]
        if r.random() < 0.3:
            aggs.append("COUNT(DISTINCT household_id) AS households")
        keys_sql = ", ".join(keys)
        return (f"SELECT {keys_sql}, {', '.join(aggs)} FROM residents{self.where(pool)} GROUP BY {keys_sql}",
                len(aggs) == 1)

    def residents_bands(self):
        r = self.rng
        if r.random() < 0.5:
            t1 = r.randint(5, 40)
            t2 = t1 + r.randint(5, 40)
            band = (f"CASE WHEN age < {t1} THEN '{t1}未満' WHEN age < {t2} THEN '{t1}-{t2 - 1}' "
                    f"ELSE '{t2}以上' END")
        else:
            w = r.choice([5, 10, 15, 20, 25])
            band = f"age // {w} * {w}"
        other = r.choice(["sex", "block", "is_current"])
        pool = [self.block_condition, lambda: "is_current", lambda: f"birth_year < {r.randint(1940, 2024)}",
                lambda: f"registered_ym < {lit(self.month(1995, 2026))}"]
        return (f"SELECT {band} AS band, {other}, COUNT(*) AS n FROM residents{self.where(pool)} GROUP BY 1, 2",
                True)

    def movements(self):
        r = self.rng
        keys = r.sample(["idou_type", "idou_year", "idou_month", "sex", "age_band", "block", "from_block"],
                        r.randint(1, 2))
        pool = [lambda: self.age_condition(), lambda: f"idou_year >= {r.randint(2021, 2026)}",
                lambda: f"idou_type IN ({in_list(r.sample(IDOU_TYPES, r.randint(1, 4)))})",
                lambda: f"idou_ym >= {lit(self.month(2021, 2026))}", lambda: self.block_condition(),
                lambda: f"idou_month BETWEEN {(m := r.randint(1, 9))} AND {m + r.randint(1, 3)}"]
        keys_sql = ", ".join(keys)
        return (f"SELECT {keys_sql}, COUNT(*) AS n FROM movements{self.where(pool)} GROUP BY {keys_sql}", True)

    def childcare(self):
        r = self.rng
        keys = r.sample(["cert_type", "facility_type", "facility_block", "sex", "block"], r.randint(1, 2))
        pool = [lambda: f"age <= {r.randint(1, 6)}", lambda: f"cert_ym >= {lit(self.month(2020, 2026))}",
                lambda: f"cert_type IN ({in_list(r.sample(CERT_TYPES, 2))})",
                lambda: self.block_condition("facility_block")]
        keys_sql = ", ".join(keys)
        agg = r.choice(["COUNT(*) AS n", "COUNT(DISTINCT person_id) AS children"])
        return f"SELECT {keys_sql}, {agg} FROM childcare{self.where(pool)} GROUP BY {keys_sql}", True

    def tax(self):
        r = self.rng
        key = r.choice(["block", "sex", "age_band"])
        measure = r.choice(["income_levy", "taxable_income", "per_capita_levy"])
        agg = r.choice([f"SUM({measure}) AS total", f"AVG({measure}) AS mean",
                        f"SUM({measure}) AS total, COUNT(*) AS n"])
        pool = [lambda: self.block_condition(), lambda: f"sex = {lit(r.choice(['男', '女']))}",
                lambda: f"age_band IN ({in_list(r.sample(BANDS[4:], r.randint(2, 10)))})"]
        where = self.where(pool, 0, 2)
        year = f"tax_year = {r.randint(2021, 2026)}"
        where = f"{where} AND {year}" if where else f" WHERE {year}"
        return f"SELECT {key}, {agg} FROM resident_tax{where} GROUP BY {key}", True

    def conditional(self):
        r = self.rng
        key = r.choice(["block", "sex", "age_band"])
        c = r.randint(15, 85)
        extra = f"COUNT(CASE WHEN age >= {c} THEN 1 END) AS n{c}"
        pool = [lambda: "is_current", lambda: self.block_condition(), lambda: f"birth_year >= {r.randint(1930, 2000)}"]
        return f"SELECT {key}, COUNT(*) AS n, {extra} FROM residents{self.where(pool)} GROUP BY {key}", False

    def join_public(self):
        r = self.rng
        if r.random() < 0.6:
            cap = r.choice(["capacity_1", "capacity_2", "capacity_3"])
            cond = r.choice([f"f.{cap} > {r.randint(0, 150)}", f"c.age <= {r.randint(1, 6)}",
                             f"c.cert_ym >= {lit(self.month(2020, 2026))}"])
            key = r.choice(["f.facility_type", "f.block", "c.cert_type"])
            return (f"SELECT {key}, COUNT(DISTINCT c.person_id) AS children FROM childcare c JOIN facilities f "
                    f"ON c.facility_id = f.facility_id WHERE {cond} GROUP BY 1", False)
        cond = r.choice([self.age_condition("r.age"), f"r.birth_year >= {r.randint(1930, 2020)}"])
        return (f"SELECT ar.block, COUNT(*) AS n FROM residents r JOIN areas ar ON r.chome_code = ar.chome_code "
                f"WHERE r.is_current AND {cond} GROUP BY 1", False)

    def post_join(self):
        r = self.rng
        cap = r.choice(["capacity_1", "capacity_2", "capacity_3"])
        a = r.randint(1, 6)
        return (f"SELECT a.block, a.n, b.cap, a.n / b.cap AS ratio FROM (SELECT block, COUNT(*) AS n FROM childcare "
                f"WHERE age <= {a} AND cert_ym >= {lit(self.month(2020, 2026))} GROUP BY block) a "
                f"JOIN (SELECT block, SUM({cap}) AS cap FROM facilities GROUP BY block) b ON a.block = b.block "
                f"ORDER BY a.block", False)

    def households(self):
        r = self.rng
        a = r.randint(50, 80)
        c = r.randint(3, 18)
        features = {"members": "COUNT(*)", "olds": f"COUNT_IF(age >= {a})", "has_child": f"BOOL_OR(age < {c})",
                    "oldest": "MAX(age)"}
        outer = r.choice(["members", "olds", "has_child"])
        inner = ", ".join(f"{expr} AS {name}" for name, expr in features.items())
        where = f"is_current AND {self.block_condition()}" if r.random() < 0.6 else \
            f"is_current AND registered_ym < {lit(self.month(1995, 2026))}"
        having = f" WHERE members >= {r.randint(1, 4)}" if outer != "members" and r.random() < 0.5 else ""
        return (f"SELECT {outer}, COUNT(*) AS households FROM (SELECT household_id, {inner} FROM residents "
                f"WHERE {where} GROUP BY household_id) AS h{having} GROUP BY {outer}", False)


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/var/tmp/guardbench/home"))
    ap.add_argument("--persons", type=int, default=530495)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--in-process", action="store_true",
                    help="check the generator against an in-process guard instead (no service, no RSS targets)")
    args = ap.parse_args()

    from _city import city_instance
    from client_fixtures import GUARD_SCOPE, HubApiDouble, ServiceProcess
    from _city import resume_held
    from sekisho.client.transport import GuardError, GuardRefusal, HttpTransport
    from sekisho.state import set_role

    inst = city_instance(args.home, args.persons)
    users = [f"{'soak_check' if args.in_process else 'soak_analyst'}_{i:03d}" for i in range(args.users)]
    gen = QueryGenerator(args.seed)
    work = [(i, *gen.next()) for i in range(args.queries)]
    print(f"{len(work)} distinct queries generated (seed {args.seed}); {sum(1 for w in work if w[2] == 'dp')} in DP "
          f"mode; {len(users)} users, {args.clients} client threads", flush=True)
    from sekisho.access import load_policy_cached
    from sekisho.guard.limits import Limits

    policy, limits = load_policy_cached(inst.policy_path), Limits.from_config(inst.config)
    print(f"policy: k={policy.disclosure.k}, alerts.pause_on={list(policy.disclosure.alerts.pause_on)}, "
          f"dp budget {policy.disclosure.dp.budget_per_period:g}/period; guard limits: {limits}", flush=True)

    answered = 0
    refused: Counter[str] = Counter()
    crashes: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    lock = threading.Lock()
    done = [0]

    if args.in_process:
        from sekisho.guard import Guard, QueryRefused

        for u in users:
            set_role(inst, u, "analyst")
        guard = Guard(inst)
        t0 = time.perf_counter()
        for i, sql, mode, eps in work:
            kwargs = {"mode": mode, "epsilon": eps} if mode else {}
            try:
                guard.query(sql, user=users[i % len(users)], **kwargs)
                answered += 1
            except QueryRefused as e:
                refused[e.code] += 1
                if len(examples[e.code]) < 3:
                    examples[e.code].append(f"{sql}  [{e.part}]")
        guard.close()
        print(f"in-process: {answered} answered, refused {dict(refused)} in {time.perf_counter() - t0:.0f}s")
        for code, sqls in examples.items():
            for s in sqls:
                print(f"  {code}: {s}")
        return

    hub = HubApiDouble().start()
    for u in users:
        set_role(inst, u, "analyst")
        hub.add_token(f"tok-soak-{u}", u, [GUARD_SCOPE])
    print(f"{resume_held(inst.home, users)} soak users on hold from earlier runs resumed", flush=True)
    service = ServiceProcess(inst.home, hub.api_url).start(timeout=180)
    proc = psutil.Process(service.proc.pid)
    rss: dict[str, float] = {}
    peak = [0.0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                peak[0] = max(peak[0], rss_mb(proc))
            except psutil.Error:
                pass

    def restart(why: str) -> None:
        nonlocal service, proc
        with lock:
            if service.proc.poll() is None:
                return
            crashes[f"service died ({why})"] += 1
            print(f"  the guard service died: {service.log_tail(2000)}", flush=True)
            service = ServiceProcess(inst.home, hub.api_url).start(timeout=180)
            proc = psutil.Process(service.proc.pid)

    try:
        first = HttpTransport(service.url, f"tok-soak-{users[0]}", timeout=300)
        first.query("SELECT sex, COUNT(*) AS n FROM residents WHERE is_current GROUP BY sex", mode=None, epsilon=None)
        rss["start"] = rss_mb(proc)
        threading.Thread(target=poll, daemon=True).start()
        print(f"guard service pid {proc.pid}: RSS at start {rss['start']:.0f} MB", flush=True)
        t0 = time.perf_counter()
        marks = {max(1, len(work) * k // 10): k for k in range(1, 11)}
        middle = len(work) // 2

        # at the middle and at the end the clients pause until nothing is in flight, so the
        # RSS read there is what the service keeps (caches, leaks), not one query's working set
        cv = threading.Condition(lock)
        state = {"in_flight": 0, "paused": False}

        def client(c: int) -> None:
            nonlocal answered
            transports: dict[str, HttpTransport] = {}
            for i, sql, mode, eps in work:
                user = users[i % len(users)]
                if (i % len(users)) % args.clients != c:
                    continue   # each user's queries from one thread, in order
                with cv:
                    while state["paused"]:
                        cv.wait()
                    state["in_flight"] += 1
                tr = transports.get(user)
                if tr is None or tr.url != service.url:
                    tr = transports[user] = HttpTransport(service.url, f"tok-soak-{user}", timeout=300)
                outcome = "answered"
                try:
                    tr.query(sql, mode=mode, epsilon=eps)
                except GuardRefusal as e:
                    outcome = e.code
                except GuardError as e:
                    outcome = f"crash:{e.code or 'transport'}"
                    if service.proc.poll() is not None:
                        restart(str(e)[:80])
                with cv:
                    state["in_flight"] -= 1
                    if outcome == "answered":
                        answered += 1
                    elif outcome.startswith("crash:"):
                        crashes[outcome[6:]] += 1
                        if len(examples[outcome]) < 3:
                            examples[outcome].append(sql)
                    else:
                        refused[outcome] += 1
                        if len(examples[outcome]) < 3:
                            examples[outcome].append(sql)
                    done[0] += 1
                    n = done[0]
                    if n == middle:
                        state["paused"] = True
                    if n in marks:
                        print(f"  {marks[n] * 10:3d}%: {n} queries, {answered} answered, RSS {rss_mb(proc):.0f} MB "
                              f"(peak so far {peak[0]:.0f} MB), {n / (time.perf_counter() - t0):.1f} q/s", flush=True)
                    cv.notify_all()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        with cv:
            while not (state["paused"] and state["in_flight"] == 0) and any(t.is_alive() for t in threads):
                cv.wait(1)
            time.sleep(1)   # the bookkeeping thread finishes the last answers
            rss["middle"] = rss_mb(proc)
            print(f"  middle: RSS {rss['middle']:.0f} MB with nothing in flight", flush=True)
            state["paused"] = False
            cv.notify_all()
        for t in threads:
            t.join()
        time.sleep(1)
        wall = time.perf_counter() - t0
        rss["end"] = rss_mb(proc)
        stop.set()
        if service.proc.poll() is not None:
            crashes["service died (at the end)"] += 1
    finally:
        stop.set()
        if crashes:
            print(f"the guard service's log (tail):\n{service.log_tail(4000)}", flush=True)
        service.stop()
        hub.stop()

    total = len(work)
    print()
    for code, sqls in sorted(examples.items()):
        for s in sqls[:2]:
            print(f"  e.g. {code}: {s}")
    print(f"{total} distinct queries through the guard service in {wall:.0f}s ({total / wall:.1f} q/s), "
          f"{args.clients} clients, {len(users)} users")
    print(f"answered {answered} ({answered / total:.0%}; target >= 50%); refused {sum(refused.values())}: "
          + (", ".join(f"{k} {v}" for k, v in refused.most_common()) or "none"))
    print(f"crashes {sum(crashes.values())} (target 0)" + (": " + ", ".join(f"{k} {v}" for k, v in crashes.items())
                                                           if crashes else ""))
    mid = rss.get("middle", float("nan"))
    print(f"guard service RSS (nothing in flight): start {rss['start']:.0f} MB, middle {mid:.0f} MB, end "
          f"{rss['end']:.0f} MB; end/middle {rss['end'] / mid:.2f} (targets: end <= 2048 MB, within 10% of middle); "
          f"peak while answering {peak[0]:.0f} MB")


if __name__ == "__main__":
    main()
