"""Mutable service state in ``state.sqlite``: the user/role registry (budgets are
kept beside it by ``sekisho.guard.budget``).

SQLite in WAL mode gives atomic, durable, multi-process transactions, which is what
a registry and a budget ledger need (the DuckDB store is replaced wholesale on every
ingest and must not hold them).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from sekisho.access import ROLES
from sekisho.errors import SekishoError
from sekisho.instance import Instance, now_tokyo, secure


class UnknownUser(SekishoError, LookupError):
    """No such user in the registry."""


_SCHEMA = """CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, created_at TEXT NOT NULL)"""
_readers = threading.local()


@contextmanager
def connect(instance: Instance) -> Iterator[sqlite3.Connection]:
    path: Path = instance.state_path
    new = not path.exists()
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute(_SCHEMA)
        if new:
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(path) + suffix)
                if p.exists():
                    secure(p)
        yield con
    finally:
        con.close()


def _reader(instance: Instance) -> sqlite3.Connection:
    """A per-thread connection for lookups on the hot path (every guard request asks
    for the caller's role). Reads are not cached: each sees the latest committed role."""
    cache = getattr(_readers, "by_path", None)
    if cache is None:
        cache = _readers.by_path = {}
    key = instance.state_file
    con = cache.get(key)
    if con is None:
        with connect(instance):  # creates the file and schema with the right owner
            pass
        con = sqlite3.connect(key, timeout=30, isolation_level=None, check_same_thread=False)
        cache[key] = con
    return con


def set_role(instance: Instance, name: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    with connect(instance) as con:
        con.execute(
            "INSERT INTO users(name, role, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET role = excluded.role",
            (name, role, now_tokyo().isoformat(timespec="seconds")))


def remove_user(instance: Instance, name: str) -> None:
    with connect(instance) as con:
        cur = con.execute("DELETE FROM users WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise UnknownUser(name)


def role_of(instance: Instance, name: str) -> str | None:
    row = _reader(instance).execute("SELECT role FROM users WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def list_users(instance: Instance) -> list[tuple[str, str, str]]:
    with connect(instance) as con:
        return con.execute("SELECT name, role, created_at FROM users ORDER BY name").fetchall()
