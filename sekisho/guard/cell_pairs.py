"""The ``differencing`` alert per cell: two releases of one user on one snapshot whose
cells of the same key differ by 1..k-1 contributors (issue 15, class 4).

Why: ``differencing`` compares whole populations. ``WHERE is_current AND birth_ym >=
'1958-07' GROUP BY block, sex`` against ``... birth_ym > '1958-07' ...`` differs by the
city's whole July-1958 cohort (k or more), yet in a block where one person was born that
month only her (block, sex) cell differs — one person; the other sex's cell is the same
set, so consistent noise gives it the same value, and the pair names her sex (0.95 against
0.50 over 40 targets; also as CASE keys, with joins, 78 such pairs as one UNION ALL).
Neither query has a neighbour that changes her cell by fewer than k, so the per-cell rule
(``cell_widening``) answers both as asked.

Rule: each boundary a user is answered is recorded per snapshot with its cells of k or
more contributors (a digest of the key, the contributors, the cell key). A new release
is compared with the user's recent ones of the same *shape* — the row SELECT with its
literals left out (``shape``): the same question asked at another constant, as range
pairs are. A cell of the same key whose contributors are 1..k-1 apart (or equal in
number with another cell key: one moved out, another in) makes the pair a candidate, and at most
``MAX_CHECKS`` candidates are checked on the store — persons in exactly one of the two,
per cell of a key where both have k or more, when one release's persons are all in the
other's (``pair_sql``). If some cell differs by 1..k-1, the alert is
raised (once per episode) and the user held if the policy pauses on ``differencing``.
Like the other alerts it is raised after the answer, on the bookkeeping thread: the pair
that raises it has been answered.

Why the same shape only: releases of different shapes over one FROM differ by small
groups all the time in ordinary work — all movements by month and type beside the
women's, moves by destination block beside origin block (the published 異動 report does
both): compared across shapes, an analyst re-running the report notebooks was paused.

Cost: per request, one digest per boundary (releases of more than ``MAX_CELLS`` released
cells are not recorded) and one index range read; a store check (two scans of the row
SELECTs) only for candidates. State: one row per release for the alert's window.
Within one query the alert would come too late — 78 such pairs as one UNION ALL named 40
persons at once — so a query holding two boundaries of one shape is refused before it
runs (``one_shape_each``, threshold mode, from the text alone): its parts are asked as
separate queries, which the alert compares.

Residual: releases of different shapes are not compared, nor releases neither of whose
populations holds the other — a pair whose second query adds a condition that changes
nobody in the target's cell but k or more elsewhere (``AND block <> '家島'``), or that moves
two ends at once, escapes; the first pair is answered; releases of more than
``MAX_CELLS`` cells escape.
"""

from __future__ import annotations

import hashlib
import time
from typing import NamedTuple

import numpy as np
import sqlglot
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.alert_state import state_of as _state
from sekisho.guard.alerts import _pause, _transaction
from sekisho.guard.errors import QueryRefused
from sekisho.instance import Instance

MAX_CELLS = 20_000   # released cells of a release recorded (larger tables are not compared)
MAX_CHECKS = 1       # candidate pairs checked on the store per request (the most recent)
RECENT = 64          # earlier releases of the same shape a new one is compared with
_DIGEST = np.dtype([("key", "<u8"), ("n", "<i8"), ("ck", "<i8")])


class CellPair(NamedTuple):
    """Two releases to check on the store: their row SELECTs and their number of keys."""
    new_sql: str
    old_sql: str
    keys: int
    old_id: int


def digest(cells: dict, keys: int, k: int) -> bytes | None:
    """The release's cells of k or more contributors as sorted (key hash, contributors,
    cell key) records; None when there are none or more than ``MAX_CELLS``."""
    n = np.asarray(cells.get(hidden.CONTRIBUTORS, ()), dtype=np.int64)
    ck = np.asarray(cells.get(hidden.CELL_KEY, np.zeros(len(n))), dtype=np.int64)
    columns = [cells.get(hidden.group_key(j)) for j in range(keys)]
    if not keys or not len(n) or any(c is None for c in columns):
        return None
    released = np.flatnonzero(n >= k)
    if not len(released) or len(released) > MAX_CELLS:
        return None
    values = [c.to_pylist() if hasattr(c, "to_pylist") else list(c) for c in columns]
    out = np.empty(len(released), dtype=_DIGEST)
    out["key"] = [_key_hash(tuple(v[i] for v in values)) for i in released.tolist()]
    out["n"], out["ck"] = n[released], ck[released]
    out.sort(order="key")
    return out.tobytes()


def _key_hash(key: tuple) -> int:
    text = "\x1f".join(f"{type(v).__name__}:{v!r}" for v in key)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def close_cells(new: bytes, old: bytes, k: int) -> int:
    """Cells of the same key whose contributors are 1..k-1 apart, or equal in number with
    another cell key (a group key that moved one person out and another in)."""
    a, b = np.frombuffer(new, dtype=_DIGEST), np.frombuffer(old, dtype=_DIGEST)
    _, ia, ib = np.intersect1d(a["key"], b["key"], assume_unique=True, return_indices=True)
    gap = np.abs(a["n"][ia] - b["n"][ib])
    return int(((gap >= 1) & (gap < k)).sum() + ((gap == 0) & (a["ck"][ia] != b["ck"][ib])).sum())


_COMPARISONS = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.EQ, exp.NEQ)


def shape(tree) -> str:
    """The row SELECT with every literal left out and every comparison one operator, as a
    digest: releases of one shape ask the same question at other constants (``>= v`` and
    ``> v`` alike)."""
    def compare(node):
        if isinstance(node, _COMPARISONS):
            return exp.Anonymous(this="compare", expressions=sorted([node.left, node.right], key=lambda e: e.sql()))
        return node
    blank = tree.copy().transform(lambda n: exp.Placeholder() if isinstance(n, exp.Literal) else n).transform(compare)
    return hashlib.blake2b(blank.sql(dialect="duckdb").encode(), digest_size=16).hexdigest()


def record(instance: Instance, alerts, *, user: str, snapshot: str, shape: str, keys: int, row_sql: str,
           cells: bytes, k: int, now: float | None = None) -> list[CellPair]:
    """Record one release (one transaction) and return the candidate pairs with the
    user's recent releases of the same shape and keys on this snapshot."""
    now = time.time() if now is None else now
    since = now - alerts.differencing_window_s
    state = _state(instance)
    con = state.con
    purge = state.purge_due("guard_cell_releases", now)
    found: list[CellPair] = []
    with _transaction(con):
        earlier = con.execute("SELECT id, row_sql, cells FROM guard_cell_releases WHERE user = ? AND snapshot = ? "
                              "AND shape = ? AND keys = ? AND ts > ? AND row_sql != ? ORDER BY id DESC LIMIT ?",
                              (user, snapshot, shape, keys, since, row_sql, RECENT)).fetchall()
        for old_id, old_sql, old_cells in earlier:
            if len(found) < MAX_CHECKS and close_cells(cells, old_cells, k):
                found.append(CellPair(row_sql, old_sql, keys, old_id))
        con.execute("DELETE FROM guard_cell_releases WHERE user = ? AND snapshot = ? AND row_sql = ?",
                    (user, snapshot, row_sql))
        con.execute("INSERT INTO guard_cell_releases(user, snapshot, shape, keys, row_sql, cells, ts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", (user, snapshot, shape, keys, row_sql, cells, now))
        if purge:
            con.execute("DELETE FROM guard_cell_releases WHERE ts < ?", (since,))
            con.execute("DELETE FROM guard_cell_pairs WHERE ts < ?", (since,))
    if purge:
        state.purged_at["guard_cell_releases"] = now
    return found


def pair_sql(pair: CellPair, k: int) -> str:
    """How many cells of a key where both releases have k or more contributors (both
    released) differ by 1..k-1 contributors — when one release's persons are all in the
    other (a range moved by one value, a cut point moved: the same persons or some more).
    Two releases that each have persons the other has not are not compared: a time series
    (households of a type a year apart, people arrive and leave) is of one shape too, and
    in a small city its rare cells differ by a few each year — every trend would pause."""
    g = ", ".join(f'"{hidden.group_key(j)}"' for j in range(pair.keys))
    side = "SELECT DISTINCT {g}, __pid FROM ({sql}) AS __r"
    released = "SELECT {g} FROM {side} GROUP BY {g} HAVING COUNT(*) >= {k}"
    return (f"WITH __a AS ({side.format(g=g, sql=pair.new_sql)}), __b AS ({side.format(g=g, sql=pair.old_sql)}), "
            f"__both AS ({released.format(g=g, side='__a', k=int(k))} INTERSECT "
            f"{released.format(g=g, side='__b', k=int(k))}), "
            "__d AS ((SELECT * FROM __a EXCEPT SELECT * FROM __b) UNION ALL (SELECT * FROM __b EXCEPT SELECT * FROM __a)), "
            "__nested AS (SELECT NOT EXISTS (SELECT __pid FROM __a EXCEPT SELECT __pid FROM __b) "
            "OR NOT EXISTS (SELECT __pid FROM __b EXCEPT SELECT __pid FROM __a) AS yes) "
            f"SELECT CASE WHEN (SELECT yes FROM __nested) THEN COUNT(*) ELSE 0 END FROM (SELECT {g}, COUNT(*) AS __n "
            f"FROM __d SEMI JOIN __both USING ({g}) GROUP BY {g}) AS __c WHERE __n < {int(k)}")


def confirm(instance: Instance, alerts, *, user: str, fingerprint: str, verified: list[tuple[CellPair, int]],
            now: float | None = None, raised_by: int | None = None, pause: bool = True) -> list[dict]:
    """Record the pairs the store confirmed (cells differing by 1..k-1); return
    ``[differencing]`` when they open an episode, holding the user if the policy pauses."""
    if not verified:
        return []
    now = time.time() if now is None else now
    con = _state(instance).con
    found: list[dict] = []
    with _transaction(con):
        episode = con.execute("SELECT 1 FROM guard_cell_pairs WHERE user = ? AND ts > ? LIMIT 1",
                              (user, now - alerts.differencing_window_s)).fetchone()
        con.executemany("INSERT INTO guard_cell_pairs(user, old_id, cells, ts) VALUES (?, ?, ?, ?)",
                        [(user, pair.old_id, cells, now) for pair, cells in verified])
        if episode is None:
            alert = {"alert": "differencing", "level": "cell", "cells": max(c for _, c in verified),
                     "window_s": alerts.differencing_window_s, "fingerprint": fingerprint}
            _pause(con, alerts, alert, user=user, now=now, raised_by=raised_by, pause=pause)
            found.append(alert)
    return found


def check_releases(instance: Instance, disclosure, released_rows, *, user: str, fingerprint: str, cursor,
                   current: str | None, raised_by: int | None, pause: bool) -> tuple[list[dict], Exception | None]:
    """Record a request's releases (``(snapshot, row SQL, keys, cells, tree)``), check the
    candidate pairs on the store (``cursor(snapshot)``: a context manager giving a DuckDB
    cursor on that snapshot), and confirm those that differ: (alerts, first store error).
    Releases of a snapshot no longer ``current`` are not recorded (their pairs would need
    the old snapshot opened; an upload replaced it before the bookkeeping ran)."""
    k, alerts = disclosure.k, disclosure.alerts
    verified, failure = [], None
    for snapshot, row_sql, keys, cells, tree in released_rows:
        blob = digest(cells, keys, k) if snapshot == current else None
        if blob is None:
            continue
        tree = tree if tree is not None else sqlglot.parse_one(row_sql, read="duckdb")
        for pair in record(instance, alerts, user=user, snapshot=snapshot, shape=shape(tree), keys=keys,
                           row_sql=row_sql, cells=blob, k=k):
            try:
                with cursor(snapshot) as cur:
                    differing = int(cur.execute(pair_sql(pair, k)).fetchone()[0])
            except Exception as exc:   # store errors (a pruned snapshot, ...): audited, no alert
                failure = failure or exc
                continue
            if differing:
                verified.append((pair, differing))
    return confirm(instance, alerts, user=user, fingerprint=fingerprint, verified=verified, raised_by=raised_by,
                   pause=pause), failure


_RANGES = (exp.GT, exp.GTE, exp.LT, exp.LTE)


def range_shape(tree) -> str:
    """``shape`` with only the constants of ranges left out (``>``, ``>=``, ``<``, ``<=``,
    BETWEEN; their operators made one): parts that differ there can hold one another's
    persons and a few more; parts that differ in an equality (``sex = '男'`` and ``= '女'``)
    or a modulus cannot."""
    def literal(node):
        return exp.Placeholder() if isinstance(node, exp.Literal) else node

    def ranges(node):
        if isinstance(node, _RANGES):
            return exp.Anonymous(this="range", expressions=sorted([literal(node.left), literal(node.right)],
                                                                 key=lambda e: e.sql()))
        if isinstance(node, exp.Between):
            return exp.Anonymous(this="range", expressions=[node.this, exp.Placeholder(), exp.Placeholder()])
        return node
    blank = tree.copy().transform(ranges)
    return hashlib.blake2b(blank.sql(dialect="duckdb").encode(), digest_size=16).hexdigest()


def one_shape_each(plan) -> None:
    """Refuse (``repeated_shape``) a query two of whose boundaries differ only in the
    constants of ranges (``range_shape``): ``>= v`` and ``> v`` as two parts of a UNION ALL
    or two CTEs joined above them. Decided from the text; kept on the cached plan."""
    repeated = getattr(plan, "_repeated_shape", None)
    if repeated is None:
        seen: set[str] = set()
        repeated = ""
        for number, bp in enumerate(plan.boundaries, start=1):
            if bp.row is None:
                continue
            s = range_shape(bp.row)
            if s in seen:
                repeated = f"aggregation {number}"
                break
            seen.add(s)
        object.__setattr__(plan, "_repeated_shape", repeated)
    if repeated:
        raise QueryRefused("repeated_shape", part=repeated)
