"""Who may do what (``sekisho.access``): the role and service vocabulary, capabilities read
from the policy, and the policy cache that follows a changed policy file."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from sekisho import access
from sekisho.access import (ADMIN, ANALYST, HUMAN_ROLES, MANAGER, REPORTS, ROLES, SERVICES, STEWARD,
                            capabilities, load_policy_cached)
from sekisho.policy import ROLE_NAMES, PolicyError, load_policy
from sekisho.resources import resource_dir

HIMEJI = resource_dir("policies") / "himeji.yaml"
PACKAGE = Path(access.__file__).parent


@pytest.fixture(scope="module")
def policy():
    return load_policy(HIMEJI)


def test_the_role_vocabulary_is_the_policys():
    # sekisho.policy validates a policy's roles: section against its own tuple (it sits
    # below sekisho.access and cannot import it); the two must name the same roles
    assert set(ROLES) == set(ROLE_NAMES)
    assert set(HUMAN_ROLES) == set(ROLES) - {REPORTS}
    assert set(access.ROLE_LABELS_JA) == set(ROLES)
    assert set(access.HUB_GROUPS) == set(HUMAN_ROLES)


def test_no_other_module_spells_a_human_role_name():
    """Role names live in sekisho.access; a literal elsewhere would be a second definition
    (keys into another library's data, like a hub auth model's ``"admin"`` flag, are not)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "access.py" and path.parent == PACKAGE:
            continue
        if path == PACKAGE / "policy" / "vocabulary.py":
            continue   # the loader's own vocabulary, kept equal by the test above
        tree = ast.parse(path.read_text(encoding="utf-8"))
        keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in HUMAN_ROLES and id(node) not in keys]
    assert not found, "role names spelled outside sekisho.access:\n" + "\n".join(found)


def test_capabilities_follow_the_policy(policy):
    analyst = capabilities(policy, ANALYST)
    assert analyst.can_query and analyst.can_start_server and analyst.can_read_reports
    assert not (analyst.can_review_audit or analyst.can_ingest or analyst.can_publish_reports)
    assert analyst.views == tuple(policy.roles[ANALYST].views) and analyst.default_mode == "threshold"
    admin = capabilities(policy, ADMIN)
    assert admin.can_review_audit and admin.can_read_reports and admin.can_publish_reports
    assert not (admin.can_query or admin.can_start_server)
    steward = capabilities(policy, STEWARD)
    assert steward.can_ingest and steward.can_publish_reports and not steward.can_query
    manager = capabilities(policy, MANAGER)
    assert manager.can_read_reports and not (manager.can_query or manager.can_publish_reports)
    reports = capabilities(policy, REPORTS)
    assert reports.can_query and not reports.condition_influence and not reports.alert_holds
    assert analyst.hub_group == "analysts" and analyst.hub_role == "sekisho-analyst"


@pytest.mark.parametrize("role", [None, "", "superuser"])
def test_no_role_may_do_nothing(policy, role):
    nothing = capabilities(policy, role)
    assert not (nothing.can_query or nothing.can_ingest or nothing.can_start_server or nothing.can_review_audit
                or nothing.can_read_reports or nothing.can_publish_reports)
    assert nothing.views == () and nothing.hub_group is None


def test_who_may_do_each_thing_under_himejis_policy(policy):
    def roles_that(flag):
        return {role for role in ROLES if getattr(capabilities(policy, role), flag)}

    assert roles_that("can_query") == {ANALYST, REPORTS}
    assert roles_that("can_read_reports") == {ANALYST, ADMIN, MANAGER}
    assert roles_that("can_review_audit") == {ADMIN}
    assert roles_that("can_ingest") == {STEWARD}
    assert roles_that("can_publish_reports") == {ADMIN, STEWARD}
    assert roles_that("can_start_server") == {ANALYST}


def test_services_are_described_once():
    for name, service in SERVICES.items():
        assert service.name == name and service.path == f"/services/{name}/"
        assert service.oauth_scopes[0] == f"access:services!service={name}"
        assert importlib.util.find_spec(service.module) is not None, service.module
    assert SERVICES[access.AUDIT_SERVICE].custom_scope == access.AUDIT_REVIEW_SCOPE
    assert SERVICES[access.REPORTS_SERVICE].custom_scope == access.REPORTS_READ_SCOPE
    assert not SERVICES[access.GUARD_SERVICE].page
    assert set(access.CUSTOM_SCOPES) == {s.custom_scope for s in SERVICES.values() if s.custom_scope}


# ---- the policy in force -----------------------------------------------------------------

def policy_text(**manager_flags) -> str:
    data = yaml.safe_load(HIMEJI.read_text(encoding="utf-8"))
    data["roles"][MANAGER].update(manager_flags)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_an_unchanged_policy_is_loaded_once(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(), encoding="utf-8")
    assert load_policy_cached(path) is load_policy_cached(path)


def test_an_edited_policy_is_reloaded(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(can_review_audit=False), encoding="utf-8")
    assert not capabilities(load_policy_cached(path), MANAGER).can_review_audit
    path.write_text(policy_text(can_review_audit=True), encoding="utf-8")
    assert capabilities(load_policy_cached(path), MANAGER).can_review_audit


def test_a_replaced_policy_of_the_same_size_and_time_is_reloaded(tmp_path):
    # os.replace of an edited copy: a new inode, even when size and mtime match
    path, edited = tmp_path / "policy.yaml", tmp_path / "policy.yaml.new"
    before, after = policy_text(can_review_audit=False) + "\n", policy_text(can_review_audit=True) + "\n\n"
    assert len(before.encode()) == len(after.encode())
    path.write_text(before, encoding="utf-8")
    assert not capabilities(load_policy_cached(path), MANAGER).can_review_audit
    edited.write_text(after, encoding="utf-8")
    stat = path.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(edited, path)
    assert capabilities(load_policy_cached(path), MANAGER).can_review_audit


def test_an_invalid_new_policy_raises_and_is_not_cached(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(), encoding="utf-8")
    load_policy_cached(path)
    path.write_text(policy_text(can_review_audit="perhaps"), encoding="utf-8")
    with pytest.raises(PolicyError, match="can_review_audit"):
        load_policy_cached(path)
    path.write_text(policy_text(can_review_audit=True), encoding="utf-8")
    assert capabilities(load_policy_cached(path), MANAGER).can_review_audit
