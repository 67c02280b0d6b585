"""``sekisho audit``: verify and read the audit trail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sekisho.audit import to_csv
from sekisho.cli.common import home_option, open_instance, os_user_name


@click.group()
def audit() -> None:
    """Verify and read the hash-chained audit trail."""


@audit.command()
@home_option
@click.option("--expect-head", default=None, metavar="SEQ:HASH",
              help="A head recorded outside the instance earlier (`sekisho audit head`).")
def verify(home: Path | None, expect_head: str | None) -> None:
    """Check every entry's hash, seal and link; exit 1 and say where on any break."""
    inst = open_instance(home)
    expected = None
    if expect_head:
        seq, _, digest = expect_head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise click.BadParameter("expected SEQ:HASH (as printed by `sekisho audit head`)",
                                     param_hint="--expect-head")
        expected = (int(seq), digest)
    result = inst.audit.verify(expect_head=expected)
    if result.ok:
        click.echo(f"audit chain OK: {result.entries} entries, head seq {result.head_seq} "
                   f"{result.head_hash[:16]}")
        return
    click.echo(f"audit chain BROKEN: {len(result.problems)} problem(s) in {result.entries} entries",
               err=True)
    for problem in result.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(1)


@audit.command()
@home_option
def head(home: Path | None) -> None:
    """Print the current head (SEQ:HASH) to keep outside the instance."""
    seq, digest = open_instance(home).audit.head()
    click.echo(f"{seq}:{digest}")


@audit.command()
@home_option
@click.option("--user", default=None, help="Only this person's events.")
@click.option("--type", "type_", default=None, help="Only this event type (a prefix like `query` matches `query.refused`).")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None, help="From this date (Asia/Tokyo).")
@click.option("--until", type=click.DateTime(formats=["%Y-%m-%d"]), default=None, help="Up to this date inclusive.")
@click.option("--csv", "as_csv", is_flag=True, help="Export as CSV.")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
def show(home: Path | None, user: str | None, type_: str | None, since, until, as_csv: bool,
         as_json: bool) -> None:
    """List audit entries, filtered (reading the trail is itself audited)."""
    inst = open_instance(home)
    entries = list(inst.audit.entries(user=user, type=type_,
                                      since=since.date() if since else None,
                                      until=until.date() if until else None))
    inst.audit.append("audit.read", user=os_user_name(), outcome="ok",
                      summary=f"{len(entries)} entries read via CLI",
                      details={"filters": {"user": user, "type": type_,
                                           "since": str(since.date()) if since else None,
                                           "until": str(until.date()) if until else None},
                               "format": "csv" if as_csv else "json" if as_json else "text"})
    if as_csv:
        click.echo(to_csv(iter(entries)), nl=False)
    elif as_json:
        for e in entries:
            click.echo(json.dumps(e, ensure_ascii=False, sort_keys=True))
    else:
        for e in entries:
            click.echo(f"{e['seq']:>6} {e['ts'][:19]} {e['type']:<16} {e['user'] or '-':<12} "
                       f"{e['outcome']:<8} {e.get('summary', '')}")
