"""Stage 2 of a query: the plan — parse once, run the analysis passes
(``analyze.PASSES``: checks, qualification, classification), rewrite into boundary row
SELECTs and post-processing (``rewrite``).

The SQL is parsed once here; every later stage works on the plan's trees, and SQL is
rendered once per statement that runs. Plans are cached per user (a shared cache makes
a query another analyst asked before faster: a timing channel), keyed by the snapshot
the query runs on, bounded LRU.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from sekisho.guard.analyze import analyze, fingerprint, parse_single_select
from sekisho.guard.catalog import Catalog
from sekisho.guard.errors import QueryRefused
from sekisho.guard.rewrite import Plan, plan as rewrite

CACHE_SIZE = 512


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


class PlanCache:
    """Plans per (user, role, snapshot, SQL), bounded LRU."""

    def __init__(self, size: int = CACHE_SIZE):
        self._size = size
        self._plans: OrderedDict[tuple[str, str, str, str], Plan] = OrderedDict()
        self._lock = threading.Lock()

    def plan(self, sql: str, *, user: str, role: str, snapshot: str, catalog: Catalog) -> Plan:
        """The plan of ``sql`` for ``user`` on ``snapshot`` (``catalog``: that snapshot's
        catalog for the role — not whichever snapshot is current by now)."""
        key = (user, role, snapshot, sql)
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                return cached
        made = make_plan(sql, catalog)
        with self._lock:
            self._plans[key] = made
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return made

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def keys(self) -> list[tuple[str, str, str, str]]:
        with self._lock:
            return list(self._plans)

    def __len__(self) -> int:
        return len(self._plans)
