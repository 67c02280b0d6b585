"""What the ``upload_decomposition`` alert costs an honest analyst, and what the monthly
publication gives away across an upload: the report notebooks run as an analyst
(condition influence on) on the 530k city and published by the ``reports`` identity, then
a month's upload, then the same notebooks again as the analyst with the same parameters
(the worst case: every query's text, and so every region class, is the same on both
snapshots) and published for the new month (what the monthly publication does).

The upload is a month of the city's own size: the newest month of movements copied one
month on (転入 1.5k, 転出 1.2k, 死亡 0.5k, 出生 0.4k, 転居 1.7k, 職権記載 20 at 530k), with
as many residents added (転入, 出生: copies of current residents under new ids and record
keys) and removed (転出, 死亡). Runs on a copy of the instance (``--home`` is not changed).

Prints per notebook and run: time and outcome; then per identity the region classes
recorded, the class pairs checked on the store, how many had a region changed by 1..k-1
persons (with the first such region), the alerts raised and whether the identity was
held (``reports`` never is: for it a changed class is what a reader of two months of
reports could sharpen). The analyst's ``differencing`` alert is an artefact of the
upload coming minutes after the first run, not a month.

    python benchmarks/honest_reruns.py [--home DIR] [--persons 530495] [--only 0]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _city import ANALYST, analyst_kernels, city_instance  # noqa: E402

from sekisho.instance import Instance  # noqa: E402
from sekisho.reports.catalog import notebooks  # noqa: E402
from sekisho.reports.periods import add_months  # noqa: E402
from sekisho.access import REPORTS_USER  # noqa: E402
from sekisho.reports.publish import publish, render_one, resolve_base_month  # noqa: E402
from sekisho.store import Store  # noqa: E402


def a_month_later(inst: Instance) -> str:
    """A new snapshot: the newest month of movements repeated one month on, residents
    added and removed to match. Returns the new month."""
    store = Store(inst)
    old = store.snapshots_dir / store.current_id() / "data.duckdb"
    with store.writer(policy_version=inst.policy_version) as w:
        con = w.connect()
        con.execute("SET memory_limit = '4GB'")
        con.execute("SET threads = 2")
        con.execute(f"ATTACH '{old}' AS old (READ_ONLY)")
        for (name,) in con.execute("SELECT table_name FROM information_schema.tables "
                                   "WHERE table_catalog = 'old'").fetchall():
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM old."{name}"')
        last = con.execute("SELECT MAX(idou_ym) FROM movements").fetchone()[0]
        month = add_months(last, 1)
        year, mon = int(month[:4]), int(month[5:7])
        counts = dict(con.execute("SELECT idou_type, COUNT(*) FROM movements WHERE idou_ym = ? GROUP BY 1",
                                  [last]).fetchall())
        arrivals = counts.get("転入", 0) + counts.get("出生", 0)
        departures = counts.get("転出", 0) + counts.get("死亡", 0)
        con.execute(f"""INSERT INTO residents SELECT * REPLACE (
                'm' || person_id AS person_id, '{month}' AS registered_ym,
                CAST(floor(random() * 256) AS SMALLINT) AS _rkey)
            FROM residents WHERE is_current USING SAMPLE {arrivals} ROWS""")
        con.execute(f"""UPDATE residents SET is_current = false, removed_ym = '{month}', removal_reason = '転出'
            WHERE person_id IN (SELECT person_id FROM residents WHERE is_current AND person_id NOT LIKE 'm%'
                                USING SAMPLE {departures} ROWS)""")
        con.execute(f"""INSERT INTO movements SELECT * REPLACE (
                'm' || person_id AS person_id, '{month}' AS idou_ym, {year} AS idou_year, {mon} AS idou_month,
                '{month}' AS notified_ym, CAST(floor(random() * 256) AS SMALLINT) AS _rkey)
            FROM movements WHERE idou_ym = '{last}'""")
        con.execute("DETACH old")
        con.close()
        w.commit()
    return month


def run_notebooks(parameters: dict, scratch: Path, only: str, label: str) -> None:
    for nb in notebooks():
        if not nb.name.startswith(only):
            continue
        outcome = render_one(nb, parameters, scratch / f"{label}-{nb.name}", meta=[])
        status = "ok" if outcome.ok else f"FAILED: {outcome.error.splitlines()[-1][:140] if outcome.error else ''}"
        print(f"{label:7s} {nb.name:12s} {outcome.seconds:7.1f} s   {status}", flush=True)


def published(label: str, inst: Instance, selected) -> None:
    t0 = time.perf_counter()
    outcomes = publish(inst, selected, caller="benchmark", caller_role=None, workers=1)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"{label:7s} published {len(outcomes)} notebooks as {REPORTS_USER} in {time.perf_counter() - t0:.1f} s"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)


def report(inst: Instance, user: str) -> None:
    with sqlite3.connect(inst.state_path) as con:
        classes = con.execute("SELECT COUNT(DISTINCT class) FROM (SELECT class FROM guard_region_partitions "
                              "WHERE user = ? UNION SELECT class FROM guard_region_pieces WHERE user = ?)",
                              (user, user)).fetchone()[0]
        checks = con.execute("SELECT COUNT(*), COALESCE(SUM(changed), 0) FROM guard_region_checks "
                             "WHERE user = ?", (user,)).fetchone()
        held = con.execute("SELECT alert FROM guard_holds WHERE user = ?", (user,)).fetchone()
    alerts = [e["details"] for e in inst.audit.entries(type="alert") if e["user"] == user]
    names = sorted({a["alert"] for a in alerts})
    regions = [a.get("region") for a in alerts if a["alert"] == "upload_decomposition"]
    queries = sum(1 for e in inst.audit.entries(type="query") if e["user"] == user)
    print(f"-- {user}: {queries} queries; region classes recorded {classes}; class pairs checked on the "
          f"store {checks[0]}, with a region changed by 1..k-1: {checks[1]}")
    print(f"   alerts: {', '.join(names) or 'none'} ({len(alerts)}); held: {held[0] if held else 'no'}"
          + (f"; upload_decomposition on: {regions[0]}" if regions else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--persons", type=int, default=530_495)
    ap.add_argument("--only", default="", help="run only notebooks whose name starts with this")
    args = ap.parse_args()
    source = city_instance(args.home, args.persons)
    scratch = Path(tempfile.mkdtemp(prefix="sekisho-honest-", dir="/var/tmp"))
    try:
        shutil.copytree(source.home, scratch / "home")
        inst = Instance.open(scratch / "home")
        analyst_kernels(inst, scratch)
        base = resolve_base_month(inst, Store(inst).current())
        parameters = {"base_month": base, "compare_month": add_months(base, -12), "period": 5,
                      "area_level": "地域ブロック"}
        print(f"-- as analyst {ANALYST}, base month {base}, on a copy at {inst.home}", flush=True)
        selected = [nb for nb in notebooks() if nb.name.startswith(args.only)]
        run_notebooks(parameters, scratch, args.only, "before")
        published("before", inst, selected)
        t0 = time.perf_counter()
        month = a_month_later(inst)
        print(f"-- upload: a month later ({month}) in {time.perf_counter() - t0:.1f} s", flush=True)
        run_notebooks(parameters, scratch, args.only, "after")
        published("after", inst, selected)
        for user in (ANALYST, REPORTS_USER):
            report(inst, user)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
