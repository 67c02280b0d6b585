"""``sekisho ingest SOURCE_DIR``: upload a source export (stewards only)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sekisho.cli.common import as_option, home_option, open_instance, resolve_caller
from sekisho.ingest import IngestError, IngestRefused, Ingestion
from sekisho.instance import drop_to_service_account
from sekisho.policy import PolicyError


@click.command()
@click.argument("source_dir", type=click.Path(path_type=Path))
@as_option
@click.option("--encoding", type=click.Choice(["auto", "utf-8", "cp932"]), default="auto",
              show_default=True,
              help="Encoding of the CSV files; auto = strict UTF-8, else CP932 (Shift_JIS).")
@click.option("--extract-date", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Date of the extract (ages are computed at it). Default: the last day of the "
                   "month of the latest register or movement date.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@home_option
def ingest(source_dir: Path, as_user: str | None, encoding: str, extract_date, quiet: bool,
           home: Path | None) -> None:
    """Validate, abstract and load SOURCE_DIR into a new store snapshot.

    The previous snapshot stays current until the new one is complete; any error leaves
    the store unchanged. Every attempt is audited.
    """
    inst = open_instance(home)
    user, operator = resolve_caller(as_user)

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    job = Ingestion(inst, user=user, operator=operator, encoding=encoding,
                    extract_date=extract_date.date() if extract_date else None,
                    progress=not quiet and sys.stderr.isatty(), log=log)
    try:
        job.authorize()
        job.open(source_dir)           # as the caller (root may read the steward's files) ...
        drop_to_service_account()      # ... then everything is written as the service account
        result = job.run()
    except IngestRefused as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(1)
    except (IngestError, PolicyError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    rows = sum(f["rows"] for f in result.files)
    click.echo(f"snapshot {result.snapshot_id} is now current (extract date {result.extract_date})")
    for f in result.files:
        click.echo(f"  {f['file']}: {f['rows']} rows, {f['encoding']}, sha256 {f['sha256'][:16]}…")
    for table, n in result.tables.items():
        click.echo(f"  table {table}: {n} rows")
    click.echo(f"{rows} source rows in {result.seconds:.1f} s; audit seq {result.audit_seq}"
               + (f"; pruned {len(result.pruned)} old snapshot(s)" if result.pruned else ""))
