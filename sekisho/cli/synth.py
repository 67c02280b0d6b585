"""``sekisho synth``: write a synthetic, Himeji-sized source export for tests and demos."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import click

from sekisho.synth import DEFAULT_EXTRACT_DATE, DEFAULT_POPULATION, SynthError, generate


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the CSV files and manifest.json (created if missing).")
@click.option("--population", "--persons", "population", type=click.IntRange(min=100),
              default=DEFAULT_POPULATION, show_default=True,
              help="Residents at the extract date (people removed during the window come on top).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives byte-identical files.")
@click.option("--encoding", type=click.Choice(["utf-8", "cp932"]), default="utf-8", show_default=True,
              help="Character encoding of the CSV files.")
@click.option("--extract-date", type=click.DateTime(formats=["%Y-%m-%d"]),
              default=DEFAULT_EXTRACT_DATE.isoformat(), show_default=True,
              help="Extract date; events cover the five years up to it.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def synth(out_dir: Path, population: int, seed: int, encoding: str, extract_date: dt.datetime,
          quiet: bool) -> None:
    """Write the six source-export CSV files of a synthetic city (合成データ) into OUT.

    Files: residents.csv, address_master.csv, movements.csv, childcare_facilities.csv,
    childcare_certifications.csv, resident_tax.csv, plus manifest.json (seed, counts, sha256).
    No real person is in them; see docs/data-dictionary.md.
    """
    started = time.perf_counter()
    try:
        manifest = generate(out_dir, population=population, seed=seed, encoding=encoding,
                            extract_date=extract_date.date(), progress=not quiet)
    except SynthError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the export to {out_dir}: {exc}") from None
    if not quiet:
        elapsed = time.perf_counter() - started
        click.echo(f"合成データを書き出しました / wrote synthetic export to {out_dir} "
                   f"(seed {seed}, {elapsed:.1f} s)", err=True)
        for name, info in manifest["files"].items():
            click.echo(f"  {name:30s} {info['rows']:>10,d} rows", err=True)
