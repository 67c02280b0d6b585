"""``sekisho users``: real system users, real PAM passwords, an audited registry."""

from __future__ import annotations

import os
import pwd
import secrets
import stat
import subprocess

import pamela
import pytest

from hub_fixtures import SEKISHO
from sekisho.instance import Instance
from sekisho.state import role_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates system users (root only)")


@pytest.fixture
def inst(tmp_path):
    return Instance.create(tmp_path / "inst")


@pytest.fixture
def name(inst):
    person = f"skt-u{secrets.token_hex(3)}"
    yield person
    if _exists(person):
        subprocess.run(["userdel", "--remove", person], capture_output=True)


def _exists(person: str) -> bool:
    try:
        pwd.getpwnam(person)
        return True
    except KeyError:
        return False


def users(inst, *args, user=None):
    cmd = [SEKISHO, "users", *args, "--home", str(inst.home)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True)


def password_in(output: str) -> str:
    return output.split("password for", 1)[1].split(":", 1)[1].split()[0]


def pam_ok(person: str, password: str) -> bool:
    try:
        pamela.authenticate(person, password, service="login")
        return True
    except pamela.PAMError:
        return False


def test_add_creates_a_private_home_a_working_password_and_an_audited_role(inst, name):
    added = users(inst, "add", name, "--role", "analyst")
    assert added.returncode == 0, added.stderr
    password = password_in(added.stdout)
    entry = pwd.getpwnam(name)
    home = os.stat(entry.pw_dir)
    assert stat.S_IMODE(home.st_mode) == 0o700 and home.st_uid == entry.pw_uid
    assert pam_ok(name, password) and not pam_ok(name, password + "x")
    assert role_of(inst, name) == "analyst"
    audit = [e for e in inst.audit.entries(type="users.add")][-1]
    assert audit["user"] == "root" and audit["details"]["name"] == name
    assert audit["details"]["role"] == "analyst" and audit["details"]["os_user_created"] is True
    assert password not in inst.audit.path.read_text()
    listed = users(inst, "list")
    assert name in listed.stdout and "analyst" in listed.stdout


def test_add_refuses_bad_names_duplicates_and_existing_accounts(inst, name):
    for bad in ("Root", "1abc", "a b", "x" * 40, "root", "sekisho"):
        result = users(inst, "add", bad, "--role", "analyst")
        assert result.returncode != 0 and ("NAME" in result.stderr or "reserved" in result.stderr), bad
    assert users(inst, "add", name, "--role", "superuser").returncode != 0
    assert users(inst, "add", name, "--role", "manager").returncode == 0
    again = users(inst, "add", name, "--role", "analyst")
    assert again.returncode != 0 and "already registered" in again.stderr
    users(inst, "remove", name)
    exists = users(inst, "add", name, "--role", "analyst")
    assert exists.returncode != 0 and "--adopt" in exists.stderr
    adopted = users(inst, "add", name, "--role", "analyst", "--adopt")
    assert adopted.returncode == 0 and "password" not in adopted.stdout
    assert role_of(inst, name) == "analyst"


def test_set_role_reset_password_and_remove_are_audited(inst, name):
    first = password_in(users(inst, "add", name, "--role", "analyst").stdout)
    assert users(inst, "set-role", name, "admin").returncode == 0
    assert role_of(inst, name) == "admin"
    changed = [e for e in inst.audit.entries(type="users.set-role")][-1]
    assert changed["details"] == {"name": name, "role": "admin", "previous": "analyst"}

    reset = users(inst, "reset-password", name)
    second = password_in(reset.stdout)
    assert pam_ok(name, second) and not pam_ok(name, first)
    assert second not in inst.audit.path.read_text()

    assert users(inst, "remove", name).returncode == 0
    assert role_of(inst, name) is None and _exists(name)  # unregistered, account kept
    assert users(inst, "remove", name, "--delete-account").returncode == 0
    assert not _exists(name)
    removals = [e["details"] for e in inst.audit.entries(type="users.remove")]
    assert removals[-2]["previous_role"] == "admin" and removals[-1]["account_deleted"] is True


def test_only_root_manages_users(inst, name):
    refused = users(inst, "add", name, "--role", "analyst", user="nobody")
    assert refused.returncode != 0 and "root" in refused.stderr
    assert not _exists(name)


def test_add_is_undone_when_the_audit_trail_cannot_be_written(inst, name):
    log = inst.audit.path
    aside = log.with_name("audit.jsonl.aside")
    log.rename(aside)
    log.mkdir()  # appending now fails (EISDIR), as a full or broken disk would
    try:
        result = users(inst, "add", name, "--role", "analyst")
    finally:
        log.rmdir()
        aside.rename(log)
    assert result.returncode != 0 and "not added" in result.stderr
    assert not _exists(name) and role_of(inst, name) is None
