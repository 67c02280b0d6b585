

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
def ingested_instance(tmp_path_factory):
    """A temp instance with users (steward suzuki, analyst tanaka, manager sato, admin
    takahashi, reports) and a ~4,000-person synthetic city (fixed seed) ingested.
    Attributes: .instance, .source_dir, .manifest, .result, .users, .steward, .analyst, ..."""
    import shutil

    from ingest_fixtures import build_ingested_city

    city = build_ingested_city(tmp_path_factory.mktemp("ingested-city-export"))
    yield city
    shutil.rmtree(city.base, ignore_errors=True)
