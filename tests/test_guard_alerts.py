"""Alert bookkeeping (``sekisho.guard.alerts``): the per-request counters give exactly the
alerts of the plain definition (count the rows in each window), in one sqlite transaction
per request, across connections, threads and restarts, and from a state file written
before the per-minute cell sums existed."""

from __future__ import annotations

import math
import random
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from sekisho.guard import alert_state
from sekisho.guard import alerts as al
from sekisho.policy import Alerts

RULES = Alerts(bulk_cells_per_hour=2_000, near_duplicate_burst=4, near_duplicate_window_s=300,
               refusal_burst=3, refusal_window_s=200, differencing_window_s=500)
T0 = 1_795_000_000.0


def _forget_connections() -> None:
    """What a restart does to this process's state: every connection is gone."""
    for state in getattr(alert_state._connections, "by_path", {}).values():
        state.con.close()
    alert_state._connections.by_path = {}


@pytest.fixture()
def inst(tmp_path: Path):
    _forget_connections()
    yield SimpleNamespace(state_path=tmp_path / "state.sqlite")
    _forget_connections()


class Reference:
    """The alert rules as defined: count the rows inside each window."""

    def __init__(self, rules: Alerts, k: int):
        self.rules, self.k = rules, k
        self.requests: list[tuple[str, float, str, bool, int]] = []
        self.populations: list[tuple[str, float, int]] = []

    def request(self, user, fp, refused, cells, populations, now) -> list[dict]:
        r = self.rules
        self.requests.append((user, now, fp, refused, cells))
        mine = [q for q in self.requests if q[0] == user]
        dup = sum(1 for q in mine if q[2] == fp and q[1] > now - r.near_duplicate_window_s)
        ref = sum(1 for q in mine if q[3] and q[1] > now - r.refusal_window_s)
        bulk = sum(q[4] for q in mine if q[1] > now - 3600)
        found = []
        if dup == r.near_duplicate_burst:
            found.append({"alert": "near_duplicate", "count": dup, "window_s": r.near_duplicate_window_s,
                          "fingerprint": fp})
        if refused and ref == r.refusal_burst:
            found.append({"alert": "refusals", "count": ref, "window_s": r.refusal_window_s})
        if bulk - cells < r.bulk_cells_per_hour <= bulk:
            found.append({"alert": "bulk", "cells_last_hour": bulk, "threshold": r.bulk_cells_per_hour})
        for p in populations:
            close = sum(1 for u, ts, q in self.populations
                        if u == user and ts > now - r.differencing_window_s and q != p and abs(q - p) < self.k)
            self.populations.append((user, now, p))
            if close == 1:
                found.append({"alert": "differencing", "window_s": r.differencing_window_s, "fingerprint": fp})
        return found


def _traffic(seed: int, n: int):
    rng = random.Random(seed)
    now = T0
    for _ in range(n):
        # mostly bursts, sometimes pauses across windows, minute boundaries and the purge horizon
        now += rng.choice([0.0, 0.5, 1.0, 7.0, 59.999, 60.0, 61.3, 250.0, 900.0, 3599.5, 7300.0])
        if rng.random() < 0.05:
            now = float(int(now // 60) * 60)   # exactly on a minute boundary
        yield (rng.choice(["ana", "bob"]), rng.choice(["f1", "f2", "f3"]), rng.random() < 0.3,
               rng.choice([0, 10, 120, 400, 900]),
               [rng.choice([100, 101, 103, 104, 105, 140, 500])] if rng.random() < 0.4 else [], now)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_alerts_match_the_definition_on_random_traffic(inst, seed) -> None:
    ref = Reference(RULES, k=5)
    raised = 0
    for user, fp, refused, cells, pops, now in _traffic(seed, 600):
        expected = ref.request(user, fp, refused, cells, pops, now)
        got = al.record_request(inst, RULES, user=user, fingerprint=fp, refused=refused, cells=cells,
                                populations=pops, k=5, now=now)
        assert got == expected, (user, now)
        raised += len(got)
    assert raised > 20   # the traffic does trigger every kind of alert now and then


def test_one_transaction_per_request(inst) -> None:
    al.record_request(inst, RULES, user="ana", fingerprint="f", refused=False, cells=1, now=T0)  # connect
    statements: list[str] = []
    alert_state.connect(inst).set_trace_callback(statements.append)
    al.record_request(inst, RULES, user="ana", fingerprint="f", refused=False, cells=1, populations=[120],
                      k=5, now=T0 + 1)
    alert_state.connect(inst).set_trace_callback(None)
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert sum(s.startswith("BEGIN") for s in statements) == 1
    assert len([s for s in statements if not s.startswith("DELETE")]) == 7


def test_counters_survive_a_restart(inst) -> None:
    for i in range(RULES.refusal_burst - 1):
        assert al.record_request(inst, RULES, user="ana", fingerprint=f"f{i}", refused=True, cells=0,
                                 now=T0 + i) == []
    _forget_connections()   # the service restarts
    found = al.record_request(inst, RULES, user="ana", fingerprint="fx", refused=True, cells=0, now=T0 + 10)
    assert [a["alert"] for a in found] == ["refusals"]


def test_connections_of_several_threads_share_the_counters(inst) -> None:
    errors: list[BaseException] = []
    found: list[dict] = []
    lock = threading.Lock()

    def work(w: int) -> None:
        try:
            for i in range(20):
                got = al.record_request(inst, RULES, user="ana", fingerprint=f"w{w}-{i}", refused=False,
                                        cells=25, now=T0 + i)
                with lock:
                    found.extend(got)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # 80 requests of 25 cells: the 2,000-cell threshold is crossed exactly once, by the last one
    assert [a["alert"] for a in found] == ["bulk"]


def test_a_state_file_from_before_the_minute_sums_is_upgraded(inst) -> None:
    # the schema and rows of the earlier version (no guard_cells table)
    con = sqlite3.connect(inst.state_path)
    con.execute("""CREATE TABLE guard_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, ts REAL NOT NULL,
        fingerprint TEXT NOT NULL, refused INTEGER NOT NULL, cells INTEGER NOT NULL)""")
    con.execute("CREATE INDEX guard_requests_user_ts ON guard_requests(user, ts)")
    con.executemany("INSERT INTO guard_requests(user, ts, fingerprint, refused, cells) VALUES (?, ?, ?, 0, ?)",
                    [("ana", T0 + 30 * i, f"f{i}", 450) for i in range(4)])   # 1,800 cells in 2 minutes
    con.commit()
    con.close()
    found = al.record_request(inst, RULES, user="ana", fingerprint="g", refused=False, cells=200, now=T0 + 200)
    assert [a["alert"] for a in found] == ["bulk"]
    assert found[0]["cells_last_hour"] == 2_000


def test_minute_buckets_are_exact_at_their_edges() -> None:
    # a row belongs to minute m exactly when m*60 <= ts < (m+1)*60, the ranges the counters select
    for m in (1, 29_916_666, 29_916_667, 10**9):
        edge = float(m * 60)
        assert alert_state.minute_of(edge) == m
        assert alert_state.minute_of(math.nextafter(edge, 0.0)) == m - 1
        assert alert_state.minute_of(math.nextafter(edge + 60, 0.0)) == m


def test_old_rows_are_purged_and_still_counted_exactly(inst) -> None:
    m = alert_state.minute_of(T0) + 10
    later = m * 60 + 30 + 7200   # purges everything before minute m (its own cutoff lies inside m)
    al.record_request(inst, RULES, user="ana", fingerprint="f", refused=False, cells=1_500, now=T0)
    al.record_request(inst, RULES, user="ana", fingerprint="f", refused=False, cells=7, now=m * 60 + 20.0)
    al.record_request(inst, RULES, user="ana", fingerprint="f", refused=False, cells=1, now=float(later))
    con = alert_state.connect(inst)
    assert [c for (c,) in con.execute("SELECT cells FROM guard_requests ORDER BY ts")] == [7, 1]
    # the sums per minute always equal the rows kept
    sums: dict = {}
    for u, ts, c in con.execute("SELECT user, ts, cells FROM guard_requests").fetchall():
        sums[(u, alert_state.minute_of(ts))] = sums.get((u, alert_state.minute_of(ts)), 0) + c
    assert {(u, m): c for u, m, c in con.execute("SELECT user, minute, cells FROM guard_cells")} == sums
