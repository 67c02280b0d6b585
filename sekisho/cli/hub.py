"""``sekisho hub``: run the analysis environment (JupyterHub) for an instance."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from sekisho.cli.common import home_option, open_instance
from sekisho.hub.config import HubConfigError, analyst_python, hub_settings
from sekisho.resources import resource_dir


def hub_command(home: Path, config_file: Path) -> list[str]:
    jupyterhub = Path(sys.prefix) / "bin" / "jupyterhub"
    if not jupyterhub.exists():
        found = shutil.which("jupyterhub")
        if not found:
            raise click.ClickException("jupyterhub is not installed in this environment")
        jupyterhub = Path(found)
    return [str(jupyterhub), "-f", str(config_file)]


@click.command()
@home_option
@click.option("--ip", default=None, help="Address people connect to (default: config.yaml hub.ip, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port people connect to (default: config.yaml hub.port, 8000).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JupyterHub config file (default: the shipped hub/jupyterhub_config.py).")
def hub(home: Path | None, ip: str | None, port: int | None, config_file: Path | None) -> None:
    """Start JupyterHub for the instance (root: it runs each person's server as their OS user)."""
    if os.geteuid() != 0:
        raise click.ClickException("sekisho hub must run as root: it starts each person's server as their "
                                   "own system user and the services as the sekisho service account")
    inst = open_instance(home)
    env = dict(os.environ, SEKISHO_HOME=str(inst.home))
    if ip:
        env["SEKISHO_HUB_IP"] = ip
    if port:
        env["SEKISHO_HUB_PORT"] = str(port)
    try:  # validate the configuration here, so mistakes are reported before JupyterHub starts
        settings = hub_settings(inst, env)
        analyst_python()
    except HubConfigError as exc:
        raise click.ClickException(str(exc)) from None
    config_file = config_file or resource_dir("hub") / "jupyterhub_config.py"
    settings.state_dir.mkdir(mode=0o700, exist_ok=True)
    cmd = hub_command(inst.home, config_file)
    click.echo(f"starting JupyterHub for {inst.home} at {settings.public_url}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(settings.state_dir)
    os.execve(cmd[0], cmd, env)  # the hub replaces this process (signals reach it directly)
