"""DP accuracy and speed on the 530k synthetic city: Sekisho and SmartNoise SQL side by side.

    /opt/sekisho/venv/bin/python benchmarks/dp_accuracy.py [--home /var/tmp/guardbench/home]
        [--runs 30] [--cells 10000]

For ε = 1 and 0.1 (δ = 1e-6) and exactly the four queries of issue 18 it prints, per
tool: the RMSE of the released cells against the raw answer (pooled over every released
cell of every run; a public-domain cell absent from the data counts with true value 0),
the share of non-empty cells released (mean over runs) and the median latency, then the
issue's targets: block counts RMSE <= 1.6 at ε = 1, 町丁目 counts at ε = 0.1 >= 75 %
released, every RMSE <= 1.1 x SmartNoise's, >= 10 x its speed on every query.

Runs: ``--runs`` (>= 20) timed full runs per query and ε, Sekisho and SmartNoise
alternating one run each, so both are timed under the same machine load (the machine
is shared). The RMSE pools at least ``--cells`` released cells: a 13-cell table gets
``cells / 13`` runs (a 1.1 x verdict between two mechanisms of equal variance needs
thousands of cells, an RMSE over 260 cells has a standard error of ~7 %), a 546-cell
table ``--runs``.

* Sekisho: ``Guard.query(sql, mode="dp", epsilon=ε)``, the whole pipeline (budget debit,
  audit, cells SQL on the snapshot, noise, post-processing), every run a full query,
  after one warm-up. The queries run as user ``bench_dp`` (an analyst); the DP budget
  they need is more than a monthly budget, so the benchmark raises
  ``disclosure.dp.budget_per_period`` in the benchmark instance's own policy copy
  (``<home>/policies/*.yaml``) when it is below what ``bench_dp`` has spent this month
  plus what the run needs, and prints what it did.
* SmartNoise SQL 1.0.10 runs in a subprocess of its own virtual environment
  (``/var/tmp/sekisho-smartnoise``, created on first use with ``python3 -m venv`` and
  ``pip install smartnoise-sql==1.0.10 duckdb==<Sekisho's DuckDB version>``; not a
  runtime dependency of Sekisho) against the same snapshot file, attached read-only in
  an in-memory DuckDB through its Postgres reader (DuckDB speaks that dialect). It is
  configured as favourably as its options allow at the same privacy: the same
  contribution bounds (``max_ids: 1`` — one row per person on ``residents``, and on
  ``resident_tax`` once the query fixes the year), the same clamping bounds, δ = 1e-6,
  ``censor_dims`` off for the queries whose keys Sekisho treats as public (block, age
  band, sex) and on for ``chome_code`` (no public domain, as in the policy). Its total
  cost is matched to ε: SmartNoise gives every noisy column the ε it is handed (with
  ``censor_dims`` the key count is a second column, cost 2ε), so the ε handed to it is
  scaled until its own ``get_privacy_cost`` reports ε (printed). SmartNoise refuses
  noise scales above 1e7 ("Noise scale is too large"), so its SUM runs on
  ``income_levy`` in thousands of yen (bounds [0, 20000]) and its answers are multiplied
  by 1000 — the same mechanism in other units. Its runs beyond the timed ones re-noise
  its own exact aggregates of the query through its own ``execute(...,
  pre_aggregated=...)`` (its mechanisms, censoring and post-processing; only the
  database pass is reused, which changes nothing but the time).

Adaptations: none to the SQL (the data's tax years are 2025 and 2026, so ``tax_year =
2026`` is kept; the column is ``income_levy``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import city_instance, snapshot_path  # noqa: E402

from sekisho.access import load_policy_cached  # noqa: E402
from sekisho.guard import Guard  # noqa: E402
from sekisho.guard import budget as ledger  # noqa: E402
from sekisho.state import set_role  # noqa: E402

USER = "bench_dp"
EPSILONS = (1.0, 0.1)
DELTA = 1e-6
SMARTNOISE_VERSION = "1.0.10"
VENV = Path("/var/tmp/sekisho-smartnoise")

# (label, SQL, keys with a public domain in the policy (SmartNoise: censor_dims off))
QUERIES = [
    ("block counts", "SELECT block, COUNT(*) FROM residents GROUP BY block", True),
    ("block x age_band x sex", "SELECT block, age_band, sex, COUNT(*) FROM residents GROUP BY block, age_band, sex",
     True),
    ("chome_code counts (current)",
     "SELECT chome_code, COUNT(*) FROM residents WHERE is_current GROUP BY chome_code", False),
    ("SUM(income_levy) by block, 2026",
     "SELECT block, SUM(income_levy) FROM resident_tax WHERE tax_year = 2026 GROUP BY block", True),
]

# the scoring both processes use (the SmartNoise runner gets this source too)
SCORE_SRC = '''
def score(truth, rows):
    """(sum of squared errors, cells released, non-empty cells released) of one answer.
    ``truth`` maps a key (JSON list as tuple) to the raw value; ``rows`` are (key..., value)."""
    sq, released, nonempty = 0.0, 0, 0
    for row in rows:
        key, value = tuple(row[:-1]), row[-1]
        if value is None:
            continue
        true = truth.get(key, 0)
        sq += (float(value) - float(true)) ** 2
        released += 1
        nonempty += key in truth and truth[key] != 0
    return sq, released, nonempty
'''
exec(SCORE_SRC)

RUNNER_SRC = SCORE_SRC + r"""
import json, sys, time
import duckdb
import snsql
from snsql import Privacy

# one JSON command per line on stdin, one JSON answer per line on stdout
job = json.loads(sys.stdin.readline())
con = duckdb.connect()
con.execute("ATTACH '" + job["snapshot"].replace("'", "''") + "' AS snap (READ_ONLY)")
con.execute("CREATE VIEW residents AS SELECT person_id, block, age_band, sex, chome_code, is_current "
            "FROM snap.residents")
# SmartNoise refuses noise scales above 1e7: income_levy in thousands of yen
con.execute("CREATE VIEW resident_tax AS SELECT person_id, tax_year, block, income_levy / 1000.0 AS income_levy "
            "FROM snap.resident_tax")


class Cursor:
    # the DB-API surface snsql's Postgres reader uses, over DuckDB
    def __init__(self, con):
        self.con, self.description, self.rows = con, None, []

    def execute(self, sql):
        cur = self.con.execute(sql)
        self.description = cur.description
        self.rows = cur.fetchall() if cur.description else []

    def __iter__(self):
        return iter(self.rows)


class Conn:
    def __init__(self, con):
        self.con = con

    def cursor(self):
        return Cursor(self.con)

    def commit(self):
        pass

    def rollback(self):
        pass


conn = Conn(con)


def metadata(censor):
    common = {"max_ids": 1, "row_privacy": False, "censor_dims": censor, "clamp_counts": False,
              "person_id": {"type": "string", "private_id": True}, "block": {"type": "string"}}
    return {"Collection": {"public": {
        "residents": dict(common, age_band={"type": "string"}, sex={"type": "string"},
                          chome_code={"type": "string"}, is_current={"type": "boolean"}),
        "resident_tax": dict(common, tax_year={"type": "int"},
                             income_levy={"type": "float", "lower": 0, "upper": 20000}),
    }}}


def reader(eps, censor):
    return snsql.from_connection(conn, privacy=Privacy(epsilon=eps, delta=job["delta"]), metadata=metadata(censor),
                                 engine="postgres")


queries = job["queries"]
truths = [{tuple(k): v for k, v in q["truth"]} for q in queries]
readers, exact = {}, {}
setup = []
for i, q in enumerate(queries):
    for eps in job["epsilons"]:
        cost = float(reader(eps, q["censor"]).get_privacy_cost(q["sql"])[0])
        handed = eps * eps / cost                      # the cost is linear in the ε handed over
        r = readers[(i, eps)] = reader(handed, q["censor"])
        setup.append({"q": i, "epsilon": eps, "handed_epsilon": handed,
                      "cost": [float(x) for x in r.get_privacy_cost(q["sql"])]})
print(json.dumps(setup), flush=True)


def rows_of(i, result):
    scale = 1000.0 if "SUM(income_levy)" in queries[i]["sql"] else 1.0
    return [list(row[:-1]) + [None if row[-1] is None else float(row[-1]) * scale] for row in result[1:]]


for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
        break
    i, eps = cmd["q"], cmd["epsilon"]
    r, sql = readers[(i, eps)], queries[i]["sql"]
    if cmd["cmd"] == "run":                            # one full execute, timed
        t0 = time.perf_counter()
        result = r.execute(sql)
        latency = time.perf_counter() - t0
        print(json.dumps({"latency": latency, "score": score(truths[i], rows_of(i, result))}), flush=True)
    elif cmd["cmd"] == "renoise":                      # its own noise on its own exact aggregates
        if (i, eps) not in exact:
            subquery, _ = r._rewrite(sql)
            exact[(i, eps)] = r.reader._execute_ast(subquery)
        scores = [score(truths[i], rows_of(i, r.execute(sql, pre_aggregated=exact[(i, eps)])))
                  for _ in range(cmd["runs"])]
        print(json.dumps({"scores": scores}), flush=True)
"""


class SmartNoise:
    """The SmartNoise runner subprocess (its own venv), driven one command at a time so
    its timed runs interleave with Sekisho's under the same machine load."""

    def __init__(self, py: Path, job: dict):
        self.proc = subprocess.Popen([str(py), "-c", RUNNER_SRC], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, encoding="utf-8")
        self.setup = self._ask(job)

    def _ask(self, message: dict):
        self.proc.stdin.write(json.dumps(message, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"SmartNoise runner exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, q: int, eps: float) -> dict:
        return self._ask({"cmd": "run", "q": q, "epsilon": eps})

    def renoise(self, q: int, eps: float, runs: int) -> list:
        return self._ask({"cmd": "renoise", "q": q, "epsilon": eps, "runs": runs})["scores"] if runs > 0 else []

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def smartnoise_python() -> Path:
    """The SmartNoise venv's interpreter, created (and given Sekisho's DuckDB) on first use."""
    py = VENV / "bin" / "python"
    want = duckdb.__version__
    check = [str(py), "-c", "import snsql, duckdb, importlib.metadata as m; "
             "print(m.version('smartnoise-sql'), duckdb.__version__)"]
    if py.exists():
        probe = subprocess.run(check, capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.split() == [SMARTNOISE_VERSION, want]:
            return py
    if not py.exists():
        base = shutil.which("python3") or sys.executable
        print(f"creating {VENV} ({base} -m venv) ...", flush=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    print(f"pip install smartnoise-sql=={SMARTNOISE_VERSION} duckdb=={want} into {VENV} ...", flush=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"smartnoise-sql=={SMARTNOISE_VERSION}",
                    f"duckdb=={want}"], check=True)
    subprocess.run(check, check=True, capture_output=True)
    return py


def ensure_budget(inst, needed: float) -> str:
    """Raise the benchmark instance's disclosure.dp.budget_per_period so that ``USER``
    can spend ``needed`` more this period."""
    policy = load_policy_cached(inst.policy_path)
    dp = policy.disclosure.dp
    spent = ledger.spent(inst, USER, ledger.current_period(dp.period))
    if dp.budget_per_period >= spent + needed:
        return f"budget_per_period {dp.budget_per_period:g} covers the run ({USER} spent {spent:g})"
    new = math.ceil(spent + needed + 1)
    path = Path(inst.policy_path)
    text = path.read_text(encoding="utf-8")
    patched, n = re.subn(r"(?m)^(\s+budget_per_period:)\s*[0-9.eE+_-]+", rf"\g<1> {new}.0", text)
    if n != 1:
        raise SystemExit(f"cannot find disclosure.dp.budget_per_period in {path}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dp_accuracy-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(patched)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    load_policy_cached(path)   # fails loudly if the edit broke the policy
    return (f"raised disclosure.dp.budget_per_period {dp.budget_per_period:g} -> {new} in {path} "
            f"({USER} spent {spent:g} this period, the run needs {needed:g})")


def sekisho_run(guard: Guard, sql: str, eps: float, truth: dict) -> tuple[float, tuple, float]:
    t0 = time.perf_counter()
    result = guard.query(sql, user=USER, mode="dp", epsilon=eps)
    latency = time.perf_counter() - t0
    names = result.table.column_names
    rows = [[r[c] for c in names] for r in result.table.to_pylist()]
    return latency, score(truth, rows), result.summary["epsilon_spent"]


def pooled(scores: list) -> tuple[float, float]:
    """(RMSE over every released cell of every run, mean non-empty cells released per run)."""
    sq = sum(s[0] for s in scores)
    released = sum(s[1] for s in scores)
    return (math.sqrt(sq / released) if released else float("nan")), statistics.mean(s[2] for s in scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path("/var/tmp/guardbench/home"))
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--runs", type=int, default=30,
                    help="timed full runs per query and ε, the two tools alternating (>= 20)")
    ap.add_argument("--cells", type=int, default=10_000,
                    help="released cells pooled per query and ε for the RMSE: more runs for small tables "
                         "(runs = max(--runs, cells / non-empty cells))")
    args = ap.parse_args()
    if args.runs < 20:
        raise SystemExit("--runs must be >= 20")

    inst = city_instance(args.home, args.persons)
    set_role(inst, USER, "analyst")
    policy = load_policy_cached(inst.policy_path)
    if policy.disclosure.dp.delta != DELTA:
        raise SystemExit(f"the policy's disclosure.dp.delta is {policy.disclosure.dp.delta}, the benchmark's {DELTA}")
    snap = snapshot_path(inst)
    truths = {}
    with duckdb.connect(str(snap), read_only=True) as con:
        for _, sql, _ in QUERIES:
            truths[sql] = {tuple(row[:-1]): row[-1] for row in con.execute(sql).fetchall()}
    total_runs = {sql: max(args.runs, math.ceil(args.cells / sum(1 for v in truths[sql].values() if v)))
                  for _, sql, _ in QUERIES}
    needed = sum(n + 1 for n in total_runs.values()) * sum(EPSILONS)
    print(ensure_budget(inst, needed), flush=True)

    py = smartnoise_python()
    job = {"snapshot": str(snap), "delta": DELTA, "epsilons": list(EPSILONS),
           "queries": [{"sql": sql, "censor": not public, "truth": [[list(k), v] for k, v in truths[sql].items()]}
                       for _, sql, public in QUERIES]}
    print(f"SmartNoise SQL {SMARTNOISE_VERSION} runner: {py}", flush=True)
    sn = SmartNoise(py, job)
    setup = {(r["q"], r["epsilon"]): r for r in sn.setup}
    guard = Guard(inst)
    results = {}
    try:
        for eps in EPSILONS:
            for q, (label, sql, _) in enumerate(QUERIES):
                truth = truths[sql]
                sekisho_run(guard, sql, eps, truth)      # warm-ups: plan, snapshot, checks, caches
                sn.run(q, eps)
                sk_lat, sk_scores, sn_lat, sn_scores, spent = [], [], [], [], set()
                for _ in range(args.runs):                # alternating, under the same load
                    latency, sc, e = sekisho_run(guard, sql, eps, truth)
                    sk_lat.append(latency)
                    sk_scores.append(sc)
                    spent.add(e)
                    answer = sn.run(q, eps)
                    sn_lat.append(answer["latency"])
                    sn_scores.append(answer["score"])
                more = total_runs[sql] - args.runs
                for _ in range(more):                     # more full Sekisho queries for the RMSE
                    _, sc, e = sekisho_run(guard, sql, eps, truth)
                    sk_scores.append(sc)
                    spent.add(e)
                sn_scores += sn.renoise(q, eps, more)
                results[(sql, eps)] = {"Sekisho": (sk_scores, statistics.median(sk_lat), sorted(spent)),
                                       "SmartNoise": (sn_scores, statistics.median(sn_lat), setup[(q, eps)])}
                print(f"  ε={eps:g} {label}: {total_runs[sql]} runs each", flush=True)
    finally:
        guard.close()
        sn.close()

    checks = []
    for eps in EPSILONS:
        print(f"\nε = {eps:g}, δ = {DELTA:g}   (RMSE pooled over all released cells of all runs; "
              f"latency: median of {args.runs} alternating runs)")
        print(f"{'query':34} {'tool':10} {'runs':>5} {'RMSE':>11} {'released':>9} {'latency':>10}   notes")
        for label, sql, public in QUERIES:
            n_true = sum(1 for v in truths[sql].values() if v)
            row = {}
            for tool in ("Sekisho", "SmartNoise"):
                scores, latency, info = results[(sql, eps)][tool]
                rmse, nonempty = pooled(scores)
                share = nonempty / n_true
                note = (f"ε spent {info}" if tool == "Sekisho" else
                        f"ε handed {info['handed_epsilon']:.4g}, its own cost (ε, δ) = "
                        f"({info['cost'][0]:.4g}, {info['cost'][1]:.2g}), censor_dims {'off' if public else 'on'}")
                row[tool] = (rmse, share, latency)
                print(f"{label:34} {tool:10} {len(scores):5d} {rmse:11.4g} {share:9.1%} {latency * 1000:8.1f}ms"
                      f"   {note}")
            (s_rmse, s_share, s_lat), (n_rmse, _, n_lat) = row["Sekisho"], row["SmartNoise"]
            print(f"{'':34} {'ratio':10} {'':5} {s_rmse / n_rmse:11.3f} {'':9} {n_lat / s_lat:7.1f}x faster")
            checks.append((f"ε={eps:g} {label}: RMSE <= 1.1 x SmartNoise's ({s_rmse:.4g} vs {n_rmse:.4g})",
                           s_rmse <= 1.1 * n_rmse))
            checks.append((f"ε={eps:g} {label}: >= 10 x SmartNoise's speed ({n_lat / s_lat:.1f}x)",
                           n_lat >= 10 * s_lat))
            if label == "block counts" and eps == 1.0:
                checks.append((f"ε=1 block counts RMSE <= 1.6 ({s_rmse:.3f})", s_rmse <= 1.6))
            if label.startswith("chome_code") and eps == 0.1:
                checks.append((f"ε=0.1 町丁目 counts >= 75% of non-empty cells released ({s_share:.1%})",
                               s_share >= 0.75))
    print("\ntargets (issue 18):")
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
