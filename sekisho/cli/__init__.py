"""The ``sekisho`` command line. Each subcommand lives in its own module and is
imported only when used, so one broken or slow part never blocks the others."""

from __future__ import annotations

import importlib
import importlib.util
import os

import click

# name -> "module:attribute"; each maps to something a person does with Sekisho
COMMANDS: dict[str, str] = {
    "init": "sekisho.cli.instance:init",
    "synth": "sekisho.cli.synth:synth",
    "ingest": "sekisho.cli.ingest:ingest",
    "audit": "sekisho.cli.audit:audit",
    "query": "sekisho.cli.query:query",
    "users": "sekisho.cli.users:users",
    "hub": "sekisho.cli.hub:hub",
    "demo": "sekisho.cli.demo:demo",
    "reports": "sekisho.cli.reports:reports",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items()
                      if importlib.util.find_spec(target.split(":")[0]) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="sekisho")
def main() -> None:
    """Sekisho (関所): secure analysis of municipal personal data."""
    # files created by any subcommand are private unless a module says otherwise
    os.umask(0o077)
