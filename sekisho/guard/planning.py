"""Stage 2 of a query: the plan — parse once, run the analysis passes
(``analyze.PASSES``: checks, qualification, classification), rewrite into boundary row
SELECTs and post-processing (``rewrite``).

The SQL is parsed once here; every later stage works on the plan's trees, and SQL is
rendered once per statement that runs. Plans are cached per user (a shared cache makes
a query another analyst asked before faster: a timing channel), keyed by the snapshot
the query runs on, bounded LRU by count and by estimated size.
"""

from __future__ import annotations

import hashlib

from sekisho.guard.analyze import analyze
from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused
from sekisho.guard.lru import SizedLRU
from sekisho.guard.rewrite import Plan, plan as rewrite
from sekisho.guard.sqltext import fingerprint, parse_single_select

CACHE_SIZE = 512
CACHE_BYTES = 64 * 2 ** 20    # estimated bytes of the plans kept, all users (``plan_bytes``)
PLAN_BYTES_PER_CHAR = 80


def make_plan(sql: str, catalog: Catalog) -> Plan:
    """``sql``'s plan against ``catalog``; anything the analysis does not handle is
    refused (fail closed)."""
    try:
        return rewrite(analyze(sql, catalog), catalog)
    except QueryRefused:
        raise
    except RecursionError:
        raise QueryRefused("too_complex") from None
    except Exception:
        raise QueryRefused("unsupported_query") from None


def refused_fingerprint(sql: object) -> str:
    """Fingerprint of a query refused before it was planned (literals masked when it
    parses, else a hash of its text), for the audit and the refusal alerts."""
    try:
        return fingerprint(parse_single_select(sql))[1]
    except Exception:
        return "raw:" + hashlib.sha256(repr(sql).encode()).hexdigest()[:16]


def plan_bytes(key: tuple[str, str, str, str], plan: Plan) -> int:
    """A plan's memory, estimated from the SQL it holds: its sqlglot trees take 50-75
    bytes per character of the query, boundary and post-processing SQL (measured with
    tracemalloc on the 530k city's queries)."""
    chars = len(key[3]) + sum(len(bp.row_sql) for bp in plan.boundaries) + len(plan.post_sql or "")
    return PLAN_BYTES_PER_CHAR * chars


class PlanCache:
    """Plans per (user, role, snapshot, SQL), bounded LRU: at most ``size`` plans and
    ``max_bytes`` of them (``plan_bytes``)."""

    def __init__(self, size: int = CACHE_SIZE, max_bytes: int = CACHE_BYTES):
        self._plans = SizedLRU(size, max_bytes, plan_bytes)

    def plan(self, sql: str, *, user: str, role: str, snapshot: str, catalog: Catalog) -> Plan:
        """The plan of ``sql`` for ``user`` on ``snapshot`` (``catalog``: that snapshot's
        catalog for the role — not whichever snapshot is current by now)."""
        key = (user, role, snapshot, sql)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        made = make_plan(sql, catalog)
        self._plans.put(key, made)
        return made

    def clear(self) -> None:
        self._plans.clear()

    def keys(self) -> list[tuple[str, str, str, str]]:
        return self._plans.keys()

    @property
    def bytes(self) -> int:
        return self._plans.bytes

    def __len__(self) -> int:
        return len(self._plans)
