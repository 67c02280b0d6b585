"""``sekisho query``: run one SQL query through the guard and print the protected table
and its disclosure summary. A refusal prints the reason to stderr and exits 3.

The SQL comes from a file (``--file PATH``) or standard input (``-``, or no argument when
standard input is not a terminal)::

    sekisho query --file q.sql
    sekisho query - <<'SQL'
    SELECT block, COUNT(*) AS n FROM residents GROUP BY block
    SQL

A command line is readable by every local user (``/proc/<pid>/cmdline``, ``ps``), and the
SQL says what an analyst is looking at; the positional SQL argument is kept for
compatibility but warns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sekisho.audit import AuditError
from sekisho.cli.common import EXIT_REFUSED, as_option, home_option, open_instance, resolve_caller
from sekisho.guard import Guard, QueryRefused

CMDLINE_WARNING = ("警告: コマンドラインの SQL は同じサーバーの他のユーザーから見えます。--file か標準入力を"
                   "使ってください / warning: command lines are visible to other local users; pass the SQL "
                   "with --file PATH or on standard input (-)")


def _read_sql(sql: str | None, sql_file: Path | None) -> str:
    """The query's SQL from ``--file``, standard input or (with a warning) the argument."""
    if sql_file is not None and sql is not None:
        raise click.UsageError("give the SQL once: --file PATH or an argument, not both "
                               "/ SQL は --file か引数のどちらか一方で指定してください")
    if sql_file is not None:
        try:
            data = sql_file.read_bytes()
        except OSError as exc:
            raise click.ClickException(f"SQL ファイルを読めません / cannot read the SQL file "
                                       f"'{sql_file}': {exc.strerror or exc}") from None
        source = f"'{sql_file}'"
    elif sql == "-" or (sql is None and sys.stdin is not None and not sys.stdin.isatty()):
        data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        source = "standard input"
    elif sql is None:
        raise click.UsageError("no SQL: give --file PATH, or '-' with the SQL on standard input "
                               "/ SQL を --file か標準入力（-）で指定してください")
    else:
        click.echo(CMDLINE_WARNING, err=True)
        return sql
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise click.ClickException(f"SQL は UTF-8 で書いてください / the SQL in {source} is not UTF-8") from None
    if not text.strip():
        raise click.UsageError(f"SQL が空です / the SQL in {source} is empty")
    return text


def _format_table(table, fmt: str) -> str:
    frame = table.to_pandas()
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", force_ascii=False)
    return frame.to_string(index=False) if len(frame) else "(結果なし / no rows)"


def _summary_lines(summary: dict) -> list[str]:
    lines = [f"方式 mode: {summary.get('mode')}",
             f"セル cells: {summary.get('cells')}  秘匿 suppressed: {summary.get('cells_suppressed')}"
             f"  優越性秘匿 dominance: {summary.get('values_suppressed_dominance')}"]
    p = summary.get("perturbation")
    if p:
        lines.append("攪乱 perturbation: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    if summary.get("mode") == "dp":
        lines.append(f"ε spent: {summary.get('epsilon_spent')}  remaining: {summary.get('epsilon_remaining')}")
    lines += [f"※ {n}" for n in summary.get("notes_ja", [])]
    lines.append(f"監査番号 audit seq: {summary.get('query_id')}")
    return lines


@click.command()
@home_option
@as_option
@click.option("--mode", type=click.Choice(["threshold", "dp"]), default=None,
              help="Protection mode (default: the role's default mode).")
@click.option("--epsilon", type=float, default=None, help="Privacy loss for DP mode (at most the policy cap).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option("--file", "sql_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="PATH", help="Read the SQL from PATH (UTF-8).")
@click.argument("sql", required=False, metavar="[-|SQL]")
def query(home: Path | None, as_user: str | None, mode: str | None, epsilon: float | None, fmt: str,
          sql_file: Path | None, sql: str | None) -> None:
    """Run SQL through the guard (aggregate-only, protected).

    The SQL is read from --file PATH, or from standard input with '-' (or with no
    argument when standard input is not a terminal). SQL given as an argument still
    works but is visible to other local users (ps, /proc) and prints a warning.
    """
    sql = _read_sql(sql, sql_file)
    inst = open_instance(home)
    user, operator = resolve_caller(as_user)
    guard = Guard(inst)
    try:
        result = guard.query(sql, user=user, mode=mode, epsilon=epsilon, operator=operator)
    except QueryRefused as refusal:
        click.echo(f"拒否 refused [{refusal.code}]: {refusal.reason}", err=True)
        if refusal.part:
            click.echo(f"  該当箇所 part: {refusal.part}", err=True)
        sys.exit(EXIT_REFUSED)
    except AuditError as exc:
        raise click.ClickException(f"no answer released: {exc}") from None
    finally:
        guard.close()
    click.echo(_format_table(result.table, fmt).rstrip("\n"))
    if fmt == "json":
        click.echo(json.dumps({"summary": result.summary}, ensure_ascii=False), err=True)
    else:
        for line in _summary_lines(result.summary):
            click.echo(line, err=(fmt == "csv"))
