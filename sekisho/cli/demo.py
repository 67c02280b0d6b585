"""``sekisho demo``: the whole environment on one machine, with a synthetic city.

Steps (each reuses what an earlier run left, so running it again is quick):

1. an instance (``sekisho init``) at ``--home`` (default ``/var/lib/sekisho-demo``);
2. one demo person per role (``sekisho users add``; passwords are printed, and reset on
   a later run so they can be printed again);
3. a synthetic city (``sekisho synth``, default 530,000 residents) ingested by the demo
   steward (``sekisho ingest --as``), unless the store already holds a snapshot;
4. the published reports (``sekisho reports publish``), when that command is installed;
5. JupyterHub (``sekisho hub``) on ``127.0.0.1:<port>``; then what to open and how to
   log in is printed (Japanese and English). Ctrl-C stops the hub.

The parts are run as separate ``sekisho`` commands, so each stays independent and every
one of them audits itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from sekisho.access import (ADMIN, ANALYST, AUDIT_SERVICE, MANAGER, REPORTS_SERVICE, SERVICES, STEWARD,
                            role_label)
from sekisho.cli import COMMANDS
from sekisho.errors import SekishoError
from sekisho.hub.config import DEFAULT_SERVICE_PORTS, hub_settings, update_hub_config
from sekisho.instance import Instance
from sekisho.state import role_of
from sekisho.store import Store

DEFAULT_HOME = Path("/var/lib/sekisho-demo")
DEFAULT_POPULATION = 530_000
DEMO_SEED = 20261031
DEMO_ROLES = (  # (role, what they do, in Japanese)
    (ANALYST, f"{role_label(ANALYST)}: JupyterLab で集計・分析"),
    (ADMIN, f"{role_label(ADMIN)}: 監査ログの確認"),
    (MANAGER, f"{role_label(MANAGER)}: 公表レポートの閲覧"),
    (STEWARD, f"{role_label(STEWARD)}: データ登録（ハブでは操作なし）"),
)


class StepFailed(SekishoError, click.ClickException):
    def __init__(self, step: str, detail: str):
        super().__init__(f"demo step '{step}' failed / デモの手順「{step}」が失敗しました:\n{detail.strip()}")


def sekisho_cmd() -> list[str]:
    return [sys.executable, "-m", "sekisho.cli"] if not (Path(sys.prefix) / "bin" / "sekisho").exists() \
        else [str(Path(sys.prefix) / "bin" / "sekisho")]


def run_step(step: str, *args: str, capture: bool = True) -> str:
    """Run one sibling command; raise StepFailed with its own message on failure."""
    proc = subprocess.run([*sekisho_cmd(), *args], capture_output=capture, text=True)
    if proc.returncode != 0:
        raise StepFailed(step, (proc.stderr or "") + (proc.stdout or "") if capture else f"exit {proc.returncode}")
    return proc.stdout or ""


def say(ja: str, en: str) -> None:
    click.echo(f"==> {ja} / {en}")


def command_available(name: str) -> bool:
    target = COMMANDS.get(name)
    return target is not None and importlib.util.find_spec(target.split(":")[0]) is not None


def port_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def make_traversable_parents(home: Path) -> None:
    """Create the directories above the instance so the service account can pass through.

    (The instance itself is 0700 and the service account's; the CLI's umask would make
    new parents 0700 root, which would lock the services out.)
    """
    missing = [p for p in [home.parent, *home.parent.parents] if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        os.chmod(directory, 0o711)


# ---- steps ----------------------------------------------------------------------------------

def ensure_instance(home: Path) -> None:
    if (home / "config.yaml").exists():
        say(f"既存のインスタンスを使います: {home}", f"reusing the instance at {home}")
        return
    say(f"インスタンスを作成します: {home}", f"creating the instance at {home}")
    run_step("init", "init", "--home", str(home))


def ensure_person(home: Path, name: str, role: str) -> str:
    """Register the demo person (creating their system user) and return a fresh password."""
    registered = role_of(Instance.open(home), name)
    if registered is None:
        try:
            pwd.getpwnam(name)
            exists = True
        except KeyError:
            exists = False
        args = ["users", "add", name, "--role", role, "--home", str(home)] + (["--adopt"] if exists else [])
        out = run_step(f"users add {name}", *args)
        match = re.search(rf"initial password for {re.escape(name)}: (\S+)", out)
        if match:
            return match.group(1)
    elif registered != role:
        run_step(f"users set-role {name}", "users", "set-role", name, role, "--home", str(home))
    out = run_step(f"users reset-password {name}", "users", "reset-password", name, "--home", str(home))
    match = re.search(rf"new password for {re.escape(name)}: (\S+)", out)
    if not match:
        raise StepFailed(f"users reset-password {name}", out)
    return match.group(1)


def ensure_data(home: Path, population: int, steward: str, reingest: bool) -> None:
    current = Store(Instance.open(home)).current()
    if current is not None and not reingest:
        rows = current.tables.get("residents", "?") if isinstance(current.tables, dict) else "?"
        say(f"登録済みのデータを使います（スナップショット {current.id}、住民 {rows} 行）",
            f"reusing the ingested snapshot {current.id} (residents: {rows} rows); --reingest loads a new city")
        return
    source = home.parent / f"{home.name}-source"
    manifest = source / "manifest.json"
    if manifest.exists() and _manifest_population(manifest) == population:
        say(f"合成データを再利用します: {source}", f"reusing the synthetic exports in {source}")
    else:
        say(f"合成データ（{population:,} 人）を作成します: {source}",
            f"synthesising a city of {population:,} residents into {source}")
        run_step("synth", "synth", "--out", str(source), "--population", str(population),
                 "--seed", str(DEMO_SEED), capture=False)
        os.chmod(source, 0o700)
    say("データを登録します（sekisho ingest）", "ingesting the exports (sekisho ingest)")
    run_step("ingest", "ingest", str(source), "--as", steward, "--home", str(home), capture=False)


def _manifest_population(manifest: Path) -> int | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("population", "persons"):
        if isinstance(data.get(key), int):
            return data[key]
        if isinstance(data.get("parameters"), dict) and isinstance(data["parameters"].get(key), int):
            return data["parameters"][key]
    return None


def publish_reports(home: Path, publisher: str) -> bool:
    if not command_available("reports"):
        say("レポート公表コマンドがないため省略します", "skipping reports: `sekisho reports` is not installed")
        return False
    published = Instance.open(home).published_dir
    if published.exists() and any(published.iterdir()):
        say("公表済みのレポートを使います", "reusing the published reports")
        return True
    say("レポートを公表します（sekisho reports publish）", "publishing the reports (sekisho reports publish)")
    try:
        run_step("reports publish", "reports", "publish", "--as", publisher, "--home", str(home), capture=False)
    except StepFailed:
        # the publisher keeps what succeeded; a failed report must not keep the rest of the demo down
        click.echo("!!! 一部のレポートを公表できませんでした（上の出力を参照）。デモは続行します。\n"
                   "!!! some reports could not be published (see above); the demo goes on.", err=True)
        return any(published.iterdir()) if published.exists() else False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_hub_ports(home: Path, port: int) -> None:
    """Keep the hub's internal ports (hub API, proxy API, services) clear of other programs."""
    inst = Instance.open(home)
    settings = hub_settings(inst)
    wanted = {"hub_port": settings.hub_port, "proxy_api_port": settings.proxy_api_port,
              **{f"service:{k}": v for k, v in settings.service_ports.items()}}
    taken = {port}
    chosen: dict[str, int] = {}
    for key, value in wanted.items():
        chosen[key] = value if value not in taken and port_free("127.0.0.1", value) else free_port()
        taken.add(chosen[key])
    if chosen != wanted:
        services = {k.split(":", 1)[1]: v for k, v in chosen.items() if k.startswith("service:")}
        update_hub_config(inst, hub_port=chosen["hub_port"], proxy_api_port=chosen["proxy_api_port"],
                          service_ports={**DEFAULT_SERVICE_PORTS, **services})
        say("内部ポートを空いている番号に変更しました", f"internal ports moved to free ones: {chosen}")


def start_hub(home: Path, ip: str, port: int) -> tuple[subprocess.Popen, Path]:
    if not port_free(ip, port):
        raise StepFailed("hub", f"{ip}:{port} is already in use (another hub?); choose --port / "
                                f"ポート {port} は使用中です。--port で別の番号を指定してください")
    ensure_hub_ports(home, port)
    log_path = home / "hub" / "hub.log"
    log_path.parent.mkdir(mode=0o700, exist_ok=True)
    say(f"JupyterHub を起動します: http://{ip}:{port}/（ログ: {log_path}）",
        f"starting JupyterHub at http://{ip}:{port}/ (log: {log_path})")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*sekisho_cmd(), "hub", "--home", str(home), "--ip", ip, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepFailed("hub", f"JupyterHub exited with status {proc.returncode}; last lines of {log_path}:\n"
                                    + "\n".join(log_path.read_text(errors="replace").splitlines()[-25:]))
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/hub/api/", timeout=2) as response:
                if response.status == 200:
                    return proc, log_path
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise StepFailed("hub", "JupyterHub did not answer within 120 s")


def print_welcome(ip: str, port: int, people: dict[str, str], passwords: dict[str, str], reports: bool) -> None:
    url = f"http://{ip}:{port}/"
    width = max(len(n) for n in passwords)
    analyst, admin, manager = people[ANALYST], people[ADMIN], people[MANAGER]
    click.echo("")
    click.echo("=" * 78)
    click.echo("関所（Sekisho）デモ環境の準備ができました / The Sekisho demo is ready")
    click.echo("=" * 78)
    click.echo(f"ブラウザで開く / open in a browser:   {url}")
    click.echo("")
    click.echo("ログイン / log in with (パスワードは今回だけ表示 / passwords shown this time only):")
    for role, ja in DEMO_ROLES:
        click.echo(f"  {people[role]:<{width}}  {passwords[people[role]]:<18}  {ja}")
    click.echo("")
    click.echo(f"  {analyst}: JupyterLab が開きます。カーネル「Sekisho（安全な分析環境）」で例:")
    click.echo("      con.sql(\"SELECT block, COUNT(*) AS n FROM residents GROUP BY block\").to_pandas()")
    click.echo("      JupyterLab opens; in the Sekisho kernel, `con` queries the guard as above.")
    click.echo(f"  {admin}: 監査ログ / audit review   {url}{SERVICES[AUDIT_SERVICE].path.lstrip('/')}")
    if reports:
        click.echo(f"  {manager}: 公表レポート / reports   {url}{SERVICES[REPORTS_SERVICE].path.lstrip('/')}")
    click.echo("")
    click.echo("停止は Ctrl-C / stop with Ctrl-C")
    click.echo("=" * 78)


@click.command()
@click.option("--home", type=click.Path(path_type=Path), default=DEFAULT_HOME, show_default=True,
              help="Instance directory for the demo (created, or reused when it exists).")
@click.option("--population", type=click.IntRange(min=100), default=DEFAULT_POPULATION, show_default=True,
              help="Residents of the synthetic city (a few thousand for a quick look).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port of the hub.")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Address of the hub.")
@click.option("--reingest", is_flag=True, help="Synthesise and ingest again even if data is loaded.")
@click.option("--no-reports", is_flag=True, help="Do not publish the reports (quicker).")
@click.option("--no-hub", is_flag=True, help="Prepare everything but do not start the hub.")
@click.option("--user-prefix", default="demo-", show_default=True,
              help="Prefix of the demo people's names (<prefix><role>).")
def demo(home: Path, population: int, port: int, ip: str, reingest: bool, no_reports: bool, no_hub: bool,
         user_prefix: str) -> None:
    """Set up and start a complete demo: synthetic city, one person per role, the hub."""
    if os.geteuid() != 0:
        raise click.ClickException("sekisho demo must run as root (it creates system users and starts the hub) / "
                                   "root で実行してください")
    home = home.resolve()
    make_traversable_parents(home)
    ensure_instance(home)
    people = {role: f"{user_prefix}{role}" for role, _ in DEMO_ROLES}
    passwords: dict[str, str] = {}
    for role, name in people.items():
        say(f"利用者 {name}（{role}）を準備します", f"preparing {name} ({role})")
        passwords[name] = ensure_person(home, name, role)
    ensure_data(home, population, people[STEWARD], reingest)
    reports = False if no_reports else publish_reports(home, people[ADMIN])
    if no_hub:
        print_welcome(ip, port, people, passwords, reports)
        click.echo(f"(--no-hub) start it with: sekisho hub --home {home} --ip {ip} --port {port}")
        return
    hub, log_path = start_hub(home, ip, port)
    print_welcome(ip, port, people, passwords, reports)
    click.echo(f"ハブのログ / hub log: {log_path}")
    try:
        hub.wait()
    except KeyboardInterrupt:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(30)
        except subprocess.TimeoutExpired:
            hub.kill()
    if hub.returncode not in (0, -signal.SIGTERM, None):
        raise click.ClickException(f"JupyterHub exited with status {hub.returncode}")
