"""Privacy budget ledger in ``state.sqlite`` (beside the user registry).

Amounts are stored as integer micro-epsilon so repeated debits never drift. A debit is
one ``BEGIN IMMEDIATE`` transaction (read spent, check, append to the ledger, commit)
made *before* any noisy answer is computed, so concurrent queries cannot overspend and a
crash after the debit never refunds. Nothing is keyed by session, view or process: a new
Guard, a restart or a new view share the same ledger row for (user, period).
"""

from __future__ import annotations

import math
import sqlite3
from contextlib import closing

from sekisho.errors import SekishoError
from sekisho.instance import Instance, now_tokyo, secure

MICRO = 1_000_000


class BudgetExceeded(SekishoError):
    """A debit would take the user past the period's budget (nothing was debited)."""


def _connect(instance: Instance) -> sqlite3.Connection:
    path = instance.state_path
    new = not path.exists()
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("""CREATE TABLE IF NOT EXISTS guard_budget_ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, period TEXT NOT NULL,
        micro_epsilon INTEGER NOT NULL CHECK (micro_epsilon > 0), ts TEXT NOT NULL,
        fingerprint TEXT NOT NULL)""")
    con.execute("CREATE INDEX IF NOT EXISTS guard_budget_user ON guard_budget_ledger(user, period)")
    if new:
        for suffix in ("", "-wal", "-shm"):
            p = path.with_name(path.name + suffix)
            if p.exists():
                secure(p)
    return con


def current_period(period: str = "month") -> str:
    if period != "month":
        raise ValueError(f"unknown budget period {period!r}")
    return now_tokyo().strftime("%Y-%m")


def to_micro(epsilon: float) -> int:
    return int(math.ceil(epsilon * MICRO - 1e-6))


def spent(instance: Instance, user: str, period: str) -> float:
    with closing(_connect(instance)) as con:
        row = con.execute("SELECT COALESCE(SUM(micro_epsilon), 0) FROM guard_budget_ledger "
                          "WHERE user = ? AND period = ?", (user, period)).fetchone()
    return row[0] / MICRO


def debit(instance: Instance, user: str, period: str, epsilon: float, total: float, fingerprint: str) -> float:
    """Debit ``epsilon`` atomically; return the remaining budget. Raises BudgetExceeded."""
    amount = to_micro(epsilon)
    cap = int(round(total * MICRO))
    with closing(_connect(instance)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            used = con.execute("SELECT COALESCE(SUM(micro_epsilon), 0) FROM guard_budget_ledger "
                               "WHERE user = ? AND period = ?", (user, period)).fetchone()[0]
            if used + amount > cap:
                con.execute("ROLLBACK")
                raise BudgetExceeded()
            con.execute("INSERT INTO guard_budget_ledger(user, period, micro_epsilon, ts, fingerprint) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (user, period, amount, now_tokyo().isoformat(timespec="milliseconds"), fingerprint))
            con.execute("COMMIT")
        except BudgetExceeded:
            raise
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    return (cap - used - amount) / MICRO
