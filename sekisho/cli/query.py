"""``sekisho query``: run one SQL query through the guard and print the protected table
and its disclosure summary. A refusal prints the reason to stderr and exits 3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sekisho.cli.common import EXIT_REFUSED, as_option, home_option, open_instance, resolve_caller


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
@click.argument("sql")
def query(home: Path | None, as_user: str | None, mode: str | None, epsilon: float | None, fmt: str,
          sql: str) -> None:
    """Run SQL through the guard (aggregate-only, protected)."""
    from sekisho.audit import AuditError
    from sekisho.guard import Guard, QueryRefused

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
