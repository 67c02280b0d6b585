"""``sekisho init``: create an instance directory."""

from __future__ import annotations

from pathlib import Path

import click

from sekisho.cli.common import home_option
from sekisho.instance import Instance, InstanceError, default_home


@click.command()
@home_option
@click.option("--policies", "policy_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Policy directory to install (default: the shipped Himeji rule set).")
def init(home: Path | None, policy_dir: Path | None) -> None:
    """Create an instance: config, secret key, store, audit log (service account only)."""
    home = home or default_home()
    try:
        inst = Instance.create(home, policy_dir=policy_dir)
    except InstanceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"instance created at {inst.home}")
    click.echo(f"policy version {inst.policy_version}; secret key generated (not shown)")
