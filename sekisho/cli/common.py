"""Helpers shared by the subcommands: the --home option, who is calling, clean failures."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import click

from sekisho.instance import SERVICE_ACCOUNT, Instance, InstanceError

EXIT_REFUSED = 3  # the guard refused a query; distinct from usage errors (2) and failures (1)

home_option = click.option(
    "--home", type=click.Path(path_type=Path), envvar="SEKISHO_HOME", default=None,
    help="Instance directory (default: $SEKISHO_HOME or /var/lib/sekisho).",
)

as_option = click.option(
    "--as", "as_user", default=None, metavar="USER",
    help="Act as USER (root only; audited as root acting for USER).",
)


def open_instance(home: Path | None) -> Instance:
    try:
        return Instance.open(home)
    except InstanceError as exc:
        raise click.ClickException(str(exc)) from None


def os_user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def resolve_caller(as_user: str | None) -> tuple[str, str | None]:
    """Return (acting user, real operator or None).

    Root may act for a named user (``--as``); the operator is then recorded as root.
    The service account reached through sudo acts for SUDO_USER. Anyone else is
    themselves and may not use --as.
    """
    me = os_user_name()
    if os.geteuid() == 0:
        return (as_user, "root") if as_user else ("root", None)
    if as_user and as_user != me:
        raise click.UsageError("only root may act as another user (--as)")
    if me == SERVICE_ACCOUNT and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"], None
    return me, None
