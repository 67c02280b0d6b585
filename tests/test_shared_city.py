"""The shared city of conftest.py stays as it was: every change a read-only test must not
make is seen by ``frozen_state`` (and fails the module that made it), and what queries
legitimately write is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard_fixtures import add_snapshot, changes, copy_city, copy_instance, frozen_state
from sekisho.guard import Guard, QueryRefused
from sekisho.guard.holds import put_hold
from sekisho.state import set_role

TESTS = Path(__file__).resolve().parent
pytest_plugins = ["pytester"]


@pytest.fixture
def city(city_template, tmp_path):
    return copy_instance(city_template, tmp_path / "inst")


def test_a_copy_is_the_same_city(city_template, city):
    assert city.home != city_template.home
    assert city.secret == city_template.secret          # the same keys: the same noise
    assert changes(frozen_state(city_template), frozen_state(city)) == []
    assert city.audit.verify().ok


def test_a_copy_of_the_ingested_city_is_the_same_city(real_city_template):
    import shutil

    copy = copy_city(real_city_template)
    try:
        assert copy.base != real_city_template.base and copy.base.stat().st_mode & 0o755 == 0o755
        assert (copy.analyst, copy.result, copy.source_dir) == \
            (real_city_template.analyst, real_city_template.result, real_city_template.source_dir)
        assert changes(frozen_state(real_city_template.instance), frozen_state(copy.instance)) == []
    finally:
        shutil.rmtree(copy.base)


def test_queries_their_ledger_and_alerts_are_not_changes(city):
    before = frozen_state(city)
    g = Guard(city)
    try:
        g.query("SELECT sex, COUNT(*) AS n FROM residents GROUP BY sex", user="ana", mode="dp", epsilon=0.1)
        burst = g.policy.disclosure.alerts.refusal_burst
        for i in range(burst):
            with pytest.raises(QueryRefused):
                g.query(f"SELECT MIN(age) + {i} FROM residents", user="ana")
    finally:
        g.close()
    assert [e["details"]["alert"] for e in city.audit.entries(type="alert")] == ["refusals"]
    assert changes(before, frozen_state(city)) == []


def _policy_edit(inst):
    text = inst.policy_path.read_text(encoding="utf-8")
    inst.policy_path.write_text(text.replace("budget_per_period: 10.0", "budget_per_period: 11.0"), encoding="utf-8")


@pytest.mark.parametrize("change, seen", [
    (lambda inst: set_role(inst, "intruder", "analyst"), "users: added [('intruder', 'analyst')]"),
    (lambda inst: set_role(inst, "ana", "reports"), "users: added [('ana', 'reports')]"),
    (lambda inst: put_hold(inst, "ana", alert="differencing"), "holds: added ['ana']"),
    (lambda inst: add_snapshot(inst, []), "file store/CURRENT"),
    (_policy_edit, "file policies/himeji.yaml"),
    (lambda inst: inst.audit.append("ingest", user="x", outcome="ok"), "'ingest')]"),
])
def test_every_forbidden_change_is_seen(city, change, seen):
    before = frozen_state(city)
    change(city)
    found = changes(before, frozen_state(city))
    assert any(seen in c for c in found), found


def test_a_module_that_changes_the_shared_city_fails(pytester):
    """The fixtures themselves, in a session of their own: the module whose test adds a
    user to the shared city errors, naming the module and the change."""
    pytester.makeconftest((TESTS / "conftest.py").read_text(encoding="utf-8"))
    pytester.syspathinsert(TESTS)
    pytester.makepyfile(test_reader="def test_reads(guard):\n"
                                    "    guard.query('SELECT COUNT(*) AS n FROM residents', user='ana')\n",
                        test_writer="from sekisho.state import set_role\n\n\n"
                                    "def test_writes(inst):\n"
                                    "    set_role(inst, 'intruder', 'analyst')\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_writer changed the shared city (use own_city)*intruder*"])
