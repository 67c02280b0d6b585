"""A query whose client has gone is stopped (issue 17; ``sekisho.guard.limits.Cancel``):
the running DuckDB statement is interrupted at once, not at the query's deadline, the
query ends as the refusal ``cancelled`` (audited, no alert: the client chose the moment,
not the data), a cancelled query waiting for admission leaves the queue, and the guard
answers the next query."""

from __future__ import annotations

import threading
import time

import pytest

from guard_fixtures import make_instance
from sekisho.guard import Guard, QueryRefused
from sekisho.guard import protection
from sekisho.guard.limits import Admission, Cancel, cancellable

SLOW = "SELECT COUNT(*) AS __n FROM range(100000000000) AS a(i) WHERE i * i % 7 = 3"   # hours, if let run
QUERY = "SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex"


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return make_instance(tmp_path_factory.mktemp("cancel") / "inst", persons=2000, seed=23)


def test_a_running_query_is_interrupted_when_cancelled_and_audited_as_such(inst, monkeypatch):
    g = Guard(inst)   # the default deadline (60 s): only the cancel can stop it in time
    try:
        g.query("SELECT COUNT(*) AS n FROM residents", user="ana")
        alerts_before = len(list(inst.audit.entries(type="alert")))
        original = protection.fetch
        started = threading.Event()

        def slow_fetch(snap, sql, **kw):
            started.set()
            return original(snap, SLOW, **kw)

        monkeypatch.setattr(protection, "fetch", slow_fetch)
        cancel, outcome = Cancel(), {}

        def run():
            try:
                g.query(QUERY, user="ana", cancel=cancel)
            except QueryRefused as refused:
                outcome["code"] = refused.code

        worker = threading.Thread(target=run)
        t0 = time.monotonic()
        worker.start()
        assert started.wait(30)
        time.sleep(0.3)                     # the statement is running in DuckDB
        cancel.cancel()
        worker.join(30)
        assert not worker.is_alive()
        assert outcome == {"code": "cancelled"}
        assert time.monotonic() - t0 < 15   # far before the 60 s deadline
        monkeypatch.setattr(protection, "fetch", original)
        g.flush()
        refused = list(inst.audit.entries(type="query.refused"))[-1]
        assert refused["details"]["code"] == "cancelled" and refused["details"]["sql"] == QUERY
        assert len(list(inst.audit.entries(type="alert"))) == alerts_before   # no resource_limit alert
        assert g.query(QUERY, user="ana").table.num_rows == 2               # the guard goes on
    finally:
        g.close()


def test_a_query_cancelled_before_it_runs_reads_nothing(inst, monkeypatch):
    g = Guard(inst)
    ran = []
    monkeypatch.setattr(protection, "fetch", lambda *a, **k: ran.append(a) or pytest.fail("executed"))
    try:
        cancel = Cancel()
        cancel.cancel()
        with pytest.raises(QueryRefused) as info:
            g.query(QUERY, user="ana", cancel=cancel)
        assert info.value.code == "cancelled" and not ran
    finally:
        g.close()


def test_a_cancelled_query_leaves_the_admission_queue():
    admission = Admission(max_running=1, per_user=1)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with admission.slot("A", time.monotonic() + 30):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    cancel, outcome = Cancel(), {}

    def wait_for_slot():
        with cancellable(cancel):
            try:
                with admission.slot("B", time.monotonic() + 30):
                    outcome["admitted"] = True
            except QueryRefused as refused:
                outcome["code"] = refused.code

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    cancel.cancel()
    waiter.join(5)
    release.set()
    holder.join(5)
    assert outcome == {"code": "cancelled"} and time.monotonic() - t0 < 2
    assert admission._waiting == [] and admission.admitted == ["A"]
