

# ---- a real JupyterHub (helper HUB; see tests/hub_fixtures.py) ----------------------------
import pytest as _pytest_for_hub


@_pytest_for_hub.fixture(scope="session")
def hub():
    """A running JupyterHub with a small ingested city and one system user per role.

    ``hub.users[role]`` (analyst, admin, manager, steward) carry PAM passwords; see
    tests/hub_fixtures.py for the helpers. Skipped where a real hub cannot run (not root,
    no configurable-http-proxy).
    """
    from hub_fixtures import hub_prerequisites, start_hub

    reason = hub_prerequisites()
    if reason:
        _pytest_for_hub.skip(reason)
    running = start_hub()
    yield running
    running.cleanup()


# ---- a small published city (helper REPORTS; see tests/reports_fixtures.py) ---------------
@_pytest_for_hub.fixture(scope="session")
def published_city(tmp_path_factory):
    """A small synthetic city, ingested, with all seven report notebooks published."""
    from reports_fixtures import build_published_city

    return build_published_city(tmp_path_factory.mktemp("published-city"))


# ---- a small ingested synthetic city (helper INGEST; see tests/ingest_fixtures.py) ---------
@_pytest_for_hub.fixture(scope="session")
def ingested_instance(real_city_template):
    """A temp instance with users (steward suzuki, analyst tanaka, manager sato, admin
    takahashi, reports) and a ~4,000-person synthetic city (fixed seed) ingested.
    Attributes: .instance, .source_dir, .manifest, .result, .users, .steward, .analyst, ...

    Shared by the session: its store, policy, config and keys, and an audit trail that only
    grows by queries, must be as they were at its end (tests that ingest build their own;
    modules add analysts of their own, and the real policy may put one on hold)."""
    import shutil

    from guard_fixtures import changes, copy_city, frozen_state

    city = copy_city(real_city_template)
    before = frozen_state(city.instance)
    yield city
    changed = changes(before, frozen_state(city.instance), parts=("files", "audit"))
    shutil.rmtree(city.base, ignore_errors=True)
    assert not changed, f"a test changed the ingested city: {changed}"


@_pytest_for_hub.fixture(scope="session")
def real_city_template(tmp_path_factory):
    """The ingested city, built once and never queried: ``ingested_instance`` and
    ``real_city`` are copies of it."""
    import shutil

    from ingest_fixtures import build_ingested_city

    city = build_ingested_city(tmp_path_factory.mktemp("ingested-city-export"))
    yield city
    shutil.rmtree(city.base, ignore_errors=True)


# ---- the shared synthetic city and the guard (see tests/guard_fixtures.py) ----------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def city_template(tmp_path_factory):
    """GUARD's planted synthetic city (``make_instance``: 3,000 residents, seed 7, the lone
    100+ woman in 家島, the dominant taxpayer in 安富), built once and never queried:
    ``shared_city`` and ``own_city`` are copies of it."""
    from guard_fixtures import make_instance

    return make_instance(tmp_path_factory.mktemp("city-template") / "inst")


@pytest.fixture(scope="session")
def shared_city(city_template, tmp_path_factory):
    """The one synthetic city the read-only tests of the session share. Its store, policy,
    config, keys, users, holds and non-query audit entries must be as they were at the
    end of every module that used it (see ``inst``) and at the end of the session.

    Queries write the DP ledger, the alert counters and the alerts they raise (audited only:
    the city's policy pauses nobody), all shared with every other module: a test that
    exhausts a budget, counts alerts or reads the audit trail's last entries, changes a role
    or the policy, adds a snapshot or puts a user on hold uses ``own_city``."""
    from guard_fixtures import changes, copy_instance, frozen_state

    city = copy_instance(city_template, tmp_path_factory.mktemp("shared-city") / "inst")
    before = frozen_state(city)
    yield city
    changed = changes(before, frozen_state(city))
    assert not changed, f"a test changed the shared city: {changed}"


@pytest.fixture(scope="module")
def own_city(city_template, tmp_path_factory):
    """A copy of the shared city private to the module, for tests that change it."""
    from guard_fixtures import copy_instance

    return copy_instance(city_template, tmp_path_factory.mktemp("own-city") / "inst")


@pytest.fixture(scope="module")
def real_city(real_city_template):
    """A copy of the ingested city (synth -> ingest -> store: the data of
    ``ingested_instance``) of the module's own, for queries under the real policy that may
    raise alerts and put its analyst on hold. ``.instance``, ``.analyst``, ..."""
    import shutil

    from guard_fixtures import copy_city

    city = copy_city(real_city_template)
    yield city
    shutil.rmtree(city.base, ignore_errors=True)


@pytest.fixture(scope="module")
def inst(shared_city, request):
    """The instance a module's tests run on: the shared city, unless the module defines
    ``inst`` itself (``own_city``, or a city of other data). Fails the module whose tests
    changed the shared city, naming what they changed."""
    from guard_fixtures import changes, frozen_state

    before = frozen_state(shared_city)
    yield shared_city
    changed = changes(before, frozen_state(shared_city))
    if changed:
        pytest.fail(f"{request.module.__name__} changed the shared city (use own_city): {changed}")


@pytest.fixture(scope="module")
def guard(inst):
    """A guard over the module's ``inst``, closed (its bookkeeping drained) after the module."""
    from sekisho.guard import Guard

    g = Guard(inst)
    yield g
    g.close()
