"""A pass-through oracle for attack tests: the attacker's SQL run directly, read-only, on
the current snapshot's ``data.duckdb``, with no protection at all. It answers like
``Guard.query`` (``.query(sql, user=...)`` -> an object with a pyarrow ``.table``), so an
attack written against the guard runs unchanged against it; an attack that does not
succeed here is not a real attack (test oracle only; never for analysts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from sekisho.instance import Instance
from sekisho.store import Store


@dataclass
class RawResult:
    table: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)


class RawOracle:
    def __init__(self, instance: Instance):
        self.store = Store(instance)

    def query(self, sql: str, *, user: str = "", **_ignored) -> RawResult:
        path = self.store.snapshots_dir / self.store.current_id() / "data.duckdb"
        with duckdb.connect(str(path), read_only=True) as con:
            return RawResult(con.execute(sql).to_arrow_table())

    def close(self) -> None:
        pass
