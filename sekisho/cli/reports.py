"""``sekisho reports``: publish the report notebooks and list what is published."""

from __future__ import annotations

import sys

import click

from sekisho.access import current_capabilities
from sekisho.cli.common import as_option, home_option, open_instance, resolve_caller
from sekisho.instance import drop_to_service_account
from sekisho.reports.catalog import select
from sekisho.reports.index import entries
from sekisho.reports.publish import PublishError
from sekisho.reports.publish import publish as run_publish
from sekisho.state import role_of


@click.group()
def reports() -> None:
    """Published reports (Himeji's list, 37 items) / 公開レポート."""


@reports.command()
@home_option
@as_option
@click.option("--base-month", metavar="YYYY-MM", default=None,
              help="基準年月 (default: the latest month in the data).")
@click.option("--compare-month", metavar="YYYY-MM", default=None,
              help="比較年月 (default: 12 months before the base month).")
@click.option("--period", type=click.IntRange(1, 5), default=5, show_default=True,
              help="期間 in years.")
@click.option("--area-level", type=click.Choice(["地域ブロック", "町丁目", "mesh"]),
              default="地域ブロック", show_default=True, help="地域区分 of the detail tables.")
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Notebooks executed in parallel.")
@click.argument("names", nargs=-1)
def publish(home, as_user, base_month, compare_month, period, area_level, workers, names) -> None:
    """Execute the report notebooks NAMES (default: all) and publish them as HTML.

    A notebook that fails keeps its previously published version; the exit status is 1
    if any failed.
    """
    caller, operator = resolve_caller(as_user)
    instance = open_instance(home)
    role = role_of(instance, caller)
    # besides root: the people who run the instance (sekisho.access: can_publish_reports)
    if operator is None and caller != "root" and not current_capabilities(instance.policy_path,
                                                                           role).can_publish_reports:
        raise click.ClickException(
            f"{caller} (role {role or 'none'}) may not publish reports; an admin or steward may "
            "/ レポートを公開する権限がありません")
    try:
        notebooks = select(names)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    drop_to_service_account()
    audit_user = f"{operator}:{caller}" if operator else caller

    def progress(outcome, done, total):
        mark = "ok " if outcome.ok else "FAILED"
        line = f"[{done}/{total}] {mark} {outcome.name} {outcome.title} ({outcome.seconds:.1f}s)"
        if not outcome.ok:
            line += f"\n      {outcome.error}"
        click.echo(line, err=not outcome.ok)

    click.echo(f"publishing {len(notebooks)} report(s) with {workers} worker(s)…")
    try:
        outcomes = run_publish(instance, notebooks, caller=audit_user, caller_role=role,
                               base_month=base_month, compare_month=compare_month, period=period,
                               area_level=area_level, workers=workers, progress=progress)
    except (PublishError, ValueError) as exc:
        instance.audit.append("publish.failed", user=audit_user, role=role, outcome="failed",
                              summary="publishing failed before any report ran",
                              details={"error": str(exc), "reports": [nb.name for nb in notebooks]})
        raise click.ClickException(str(exc)) from None
    failed = [o for o in outcomes if not o.ok]
    click.echo(f"published {len(outcomes) - len(failed)}/{len(outcomes)} into {instance.published_dir}")
    if failed:
        sys.exit(1)


@reports.command("list")
@home_option
def list_reports(home) -> None:
    """List published reports: title, 基準年月, published at, data snapshot."""
    instance = open_instance(home)
    rows = entries(instance.published_dir)
    if not rows:
        click.echo("no reports published yet / 公開済みのレポートはありません")
        return
    for e in rows:
        click.echo(f"{e['name']}\t{e['title']}\t基準年月 {e['base_month']}\t"
                   f"{e['published_at']}\t{e['snapshot']}\t{e['digest'][:19]}")
