"""Privacy budget ledger in ``state.sqlite`` (beside the user registry).

Amounts are stored as integer micro-epsilon so repeated debits never drift. A debit is
one ``BEGIN IMMEDIATE`` transaction (read spent, check, append to the ledger, commit)
made *before* any noisy answer is computed, so concurrent queries cannot overspend and a
crash after the debit never refunds. Nothing is keyed by session, view or process: a new
Guard, a restart or a new view share the same ledger row for (user, period).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading

from sekisho.errors import SekishoError
from sekisho.instance import Instance, now_tokyo, secure

MICRO = 1_000_000


class BudgetExceeded(SekishoError):
    """A debit would take the user past the period's budget (nothing was debited)."""


_connections = threading.local()
_PER_THREAD = 4   # ledgers a thread keeps open (a guard has one; tests open many in turn)


def _connection(instance: Instance) -> sqlite3.Connection:
    """This thread's open connection to the instance's ledger: a debit is on the answer's
    path, and opening one (connect, pragmas, schema) cost about as much as the debit.
    Kept per process, thread and file (device and inode: a state file replaced at the
    same path gets a new connection, never the old ledger)."""
    path = instance.state_path
    try:
        st = os.stat(path)
        key = (os.getpid(), str(path), st.st_dev, st.st_ino)
    except FileNotFoundError:
        key = None
    open_ = getattr(_connections, "open", None)
    if open_ is None:
        open_ = _connections.open = {}
    if key is not None and key in open_:
        return open_[key]
    con = _connect(instance)
    st = os.stat(path)
    key = (os.getpid(), str(path), st.st_dev, st.st_ino)
    for stale in [k for k in open_ if k[1] == str(path) or k[0] != os.getpid()]:
        _close(open_.pop(stale))
    while len(open_) >= _PER_THREAD:
        _close(open_.pop(next(iter(open_))))
    open_[key] = con
    return con


def _close(con: sqlite3.Connection) -> None:
    try:
        con.close()
    except sqlite3.Error:
        pass


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
    con = _connection(instance)
    row = con.execute("SELECT COALESCE(SUM(micro_epsilon), 0) FROM guard_budget_ledger "
                      "WHERE user = ? AND period = ?", (user, period)).fetchone()
    return row[0] / MICRO


def debit(instance: Instance, user: str, period: str, epsilon: float, total: float, fingerprint: str) -> float:
    """Debit ``epsilon`` atomically; return the remaining budget. Raises BudgetExceeded."""
    amount = to_micro(epsilon)
    cap = int(round(total * MICRO))
    con = _connection(instance)
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
