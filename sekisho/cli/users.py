"""``sekisho users``: the people who use Sekisho, their OS accounts and their roles.

Each person has a system user (PAM login to the hub; their JupyterLab server runs as
that user, home 0700) and one role in the instance's registry. Every change is
audited (``users.add``, ``users.remove``, ``users.set-role``). Root only: creating
system users and writing the service account's registry need it. ``resume`` (lift a
guard hold after review, audited as ``guard.resume``) is also open to the people who
review the audit trail (admins: ``can_review_audit``) acting through the service account
(``sudo -u sekisho``).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import subprocess
from datetime import datetime
from pathlib import Path

import click

from sekisho.access import HUMAN_ROLES, REPORTS_USER, current_capabilities
from sekisho.audit import AuditError
from sekisho.cli.common import home_option, open_instance, os_user_name, resolve_caller
from sekisho.instance import SERVICE_ACCOUNT, TOKYO, Instance
from sekisho.state import UnknownUser, list_users, remove_user, role_of, set_role

# POSIX portable user names, lower case (the hub lower-cases names; they must match)
NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
RESERVED = frozenset({"root", SERVICE_ACCOUNT, REPORTS_USER, "nobody", "daemon", "bin", "sys"})
PASSWORD_BYTES = 12  # token_urlsafe(12): 16 characters, 96 bits


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("sekisho users must be run as root (it manages system users and the "
                                   "service account's registry)")


def _check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise click.BadParameter(f"{name!r}: use 1-32 characters a-z, 0-9, '_' or '-', starting with a "
                                 "letter or '_'", param_hint="NAME")
    if name in RESERVED:
        raise click.BadParameter(f"{name!r} is reserved", param_hint="NAME")
    return name


def os_user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _run(cmd: list[str], *, stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


def create_os_user(name: str) -> Path:
    home = Path("/home") / name
    _run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash",
          "--user-group", "--comment", "Sekisho user", name])
    os.chmod(home, 0o700)  # other people (and other analysts) cannot look in
    return home


def set_random_password(name: str) -> str:
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _run(["chpasswd"], stdin=f"{name}:{password}\n")
    return password


def delete_os_user(name: str) -> None:
    _run(["userdel", "--remove", name])


def _audit(inst: Instance, type: str, *, name: str, summary: str, details: dict) -> None:
    operator = os.environ.get("SUDO_USER") or os_user_name()
    inst.audit.append(type, user=operator, role=None, outcome="ok", summary=summary,
                      details={"name": name, **details})


@click.group()
def users() -> None:
    """Add, list, change and remove the people who use Sekisho (root only)."""


@users.command()
@home_option
@click.argument("name")
@click.option("--role", type=click.Choice(HUMAN_ROLES), required=True, help="The person's Sekisho role.")
@click.option("--adopt", is_flag=True,
              help="Register an existing system user (e.g. from LDAP/SSSD) without touching its password.")
def add(home: Path | None, name: str, role: str, adopt: bool) -> None:
    """Create system user NAME (home 0700, random password printed once) with ROLE."""
    _require_root()
    _check_name(name)
    inst = open_instance(home)
    if role_of(inst, name) is not None:
        raise click.ClickException(f"{name} is already registered (role {role_of(inst, name)}); "
                                   "use `sekisho users set-role` to change the role")
    exists = os_user_exists(name)
    if exists and not adopt:
        raise click.ClickException(f"system user {name} already exists; pass --adopt to register it")
    if adopt and not exists:
        raise click.ClickException(f"--adopt: there is no system user {name}")
    password = None
    created = False
    try:
        if not exists:
            create_os_user(name)
            created = True
            password = set_random_password(name)
        set_role(inst, name, role)
        _audit(inst, "users.add", name=name, summary=f"user {name} added as {role}",
               details={"role": role, "os_user_created": created, "uid": pwd.getpwnam(name).pw_uid})
    except (AuditError, click.ClickException, OSError) as exc:
        # undo what was done: a person is either fully added (and audited) or not at all
        if role_of(inst, name) is not None:
            remove_user(inst, name)
        if created:
            delete_os_user(name)
        if isinstance(exc, click.ClickException):
            raise
        raise click.ClickException(f"user {name} not added: {exc}") from None
    click.echo(f"added {name} as {role}")
    if password:
        click.echo(f"initial password for {name}: {password}")
        click.echo("  (shown once; hand it over in person and have it changed with `passwd` / "
                   "初期パスワードは一度だけ表示されます)")


@users.command("list")
@home_option
def list_(home: Path | None) -> None:
    """List registered people and their roles."""
    inst = open_instance(home)
    rows = [r for r in list_users(inst) if r[1] in HUMAN_ROLES]
    if not rows:
        click.echo("no users")
        return
    for name, role, created in rows:
        account = "system user" if os_user_exists(name) else "NO SYSTEM USER"
        click.echo(f"{name:<24} {role:<8} {created}  {account}")


@users.command("set-role")
@home_option
@click.argument("name")
@click.argument("role", type=click.Choice(HUMAN_ROLES))
def set_role_(home: Path | None, name: str, role: str) -> None:
    """Change NAME's role (effective at once in the services, within a minute in the hub)."""
    _require_root()
    inst = open_instance(home)
    previous = role_of(inst, name)
    if previous is None:
        raise click.ClickException(f"{name} is not registered (use `sekisho users add`)")
    if previous == role:
        click.echo(f"{name} already has role {role}")
        return
    set_role(inst, name, role)
    try:
        _audit(inst, "users.set-role", name=name, summary=f"role of {name}: {previous} -> {role}",
               details={"role": role, "previous": previous})
    except AuditError as exc:
        set_role(inst, name, previous)
        raise click.ClickException(f"role not changed: {exc}") from None
    click.echo(f"{name}: {previous} -> {role}")


@users.command()
@home_option
@click.argument("name")
@click.option("--delete-account", is_flag=True, help="Also delete the system user and its home directory.")
def remove(home: Path | None, name: str, delete_account: bool) -> None:
    """Unregister NAME (they can no longer log in); optionally delete the system user."""
    _require_root()
    inst = open_instance(home)
    previous = role_of(inst, name)
    if previous is None and not delete_account:
        raise click.ClickException(f"{name} is not registered")
    if previous is not None:
        try:
            remove_user(inst, name)
        except UnknownUser:
            previous = None
    try:
        _audit(inst, "users.remove", name=name, summary=f"user {name} removed",
               details={"previous_role": previous, "account_deleted": delete_account and os_user_exists(name)})
    except AuditError as exc:
        if previous is not None:
            set_role(inst, name, previous)
        raise click.ClickException(f"user not removed: {exc}") from None
    if delete_account and os_user_exists(name):
        delete_os_user(name)
    click.echo(f"removed {name}" + (" and the system user" if delete_account else ""))


@users.command("reset-password")
@home_option
@click.argument("name")
def reset_password(home: Path | None, name: str) -> None:
    """Give registered person NAME a new random password (printed once)."""
    _require_root()
    inst = open_instance(home)
    if role_of(inst, name) is None:
        raise click.ClickException(f"{name} is not registered")
    if not os_user_exists(name):
        raise click.ClickException(f"there is no system user {name}")
    password = set_random_password(name)
    try:
        _audit(inst, "users.set-password", name=name, summary=f"password of {name} reset", details={})
    except AuditError as exc:
        raise click.ClickException(f"the password of {name} was reset but could not be audited: {exc}; "
                                   "reset it again once the audit trail is writable") from None
    click.echo(f"new password for {name}: {password}")


@users.command()
@home_option
@click.argument("name")
def resume(home: Path | None, name: str) -> None:
    """Lift the guard's hold on NAME after reviewing the alert that paused them (root, or a
    person whose role reviews the audit trail: an admin)."""
    # here, not at the top: importing sekisho.guard loads the whole guard (DuckDB,
    # diffprivlib), which the other users commands do not need
    from sekisho.guard import alerts

    inst = open_instance(home)
    if os.geteuid() != 0:
        caller, _ = resolve_caller(None)
        if not current_capabilities(inst.policy_path, role_of(inst, caller)).can_review_audit:
            raise click.ClickException(f"{caller} may not resume users; root or an admin may "
                                       "/ 照会の再開は管理者のみ可能です")
    hold = alerts.resume(inst, name)
    if hold is None:
        click.echo(f"{name} is not on hold")
        return
    since = datetime.fromtimestamp(hold["since"], TOKYO).isoformat(timespec="seconds")
    try:
        _audit(inst, "guard.resume", name=name, summary=f"{name} resumed after review of a {hold['alert']} alert",
               details={"resumed": name, "alert": hold["alert"], "since": since, "raised_by": hold["raised_by"]})
    except AuditError as exc:
        alerts.put_hold(inst, name, alert=hold["alert"], raised_by=hold["raised_by"], since=hold["since"])
        raise click.ClickException(f"{name} not resumed: {exc}") from None
    click.echo(f"{name} resumed (on hold since {since}, alert {hold['alert']})")
