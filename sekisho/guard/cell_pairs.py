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
more contributors (a digest of the key, the contributors, the cell key). A new release is
compared with the user's recent ones of the same *family* — the same views, the
conditions of one all among the other's (``family``, ``related``: a condition added, a
constant moved), whatever the measures, the keys or how they are spelt: cells are matched
by their key values and the store decides what they hold.
A cell of the same key whose contributors are 1..k-1 apart (or equal in number with
another cell key: one moved out, another in) makes the pair a candidate; candidates
whose cells all moved one way (one population holding the other, as a range moved by a
value does) come first, then the most recent, and at most ``MAX_CHECKS`` are checked on
the store (the rest wait for the user's next requests, ``cell_checks``; pairs whose
sketches rule out nesting, ``cell_sketches``, need no check) — persons in
exactly one of the two, per cell of a key where both have k or more, when one release's persons are all in the other's (``pair_sql``). If some cell
differs by 1..k-1, the alert is raised (once per episode) and the user held if the
policy pauses on ``differencing``. Like the other alerts it is raised after the answer,
on the bookkeeping thread: the pair that raises it has been answered.

Why the family and not the text: a first version compared only releases of one *shape*
(the row SELECT with its literals left out); adding ``AND block <> '家島'`` (changing
nobody in the target's cell, k or more elsewhere), a measure, or a key spelt as a CASE
made another shape, and the pair escaped. Why related conditions only: releases of one
view under unrelated conditions differ by small groups in ordinary work — children
certified at a month beside children using a facility, by 認定区分 (the published 教育・保育
report): compared, an analyst re-running the reports was paused. Why nested pairs only: a time series
(households of a type a year apart; people arrive and leave) is of one family too, and
in a small city its rare cells differ by a few each year — every trend would pause. A
nested pair that differs in a released cell by 1..k-1 says how many (0 or more) of a
small group are in that cell, whoever asks it: the published reports ask each table
once, by every key at once (``GROUP BY month, sex``, not all beside women).

Cost: per request, one digest per boundary (releases of more than ``MAX_CELLS`` released
cells are not recorded) and one index range read; a store check (two scans of the row
SELECTs) only for candidates, at most ``MAX_CHECKS`` new and ``MAX_CHECKS`` waiting ones. State: one row per release for the alert's window.
Within one query the alert would come too late — 78 such pairs as one UNION ALL named 40
persons at once — so two boundaries that differ only in the constants of ranges are
refused from the text, and other boundaries of one family are digested after the cells
scan and their close pairs checked on the store before the answer: a pair is refused
with the alert and the hold (``sekisho.guard.request_pairs``).

Margins: a release is recorded by every smaller set of its keys too (``margins``: the
cells summed), and cells are matched by their key values as a multiset — a key of one
value added to the second query, or the keys in another order, is the same table.

Residual: the first pair asked one by one is answered (one pair per admin review); a
second query whose conditions are rewritten so that neither's are among the other's (an
OR around the moved range) is not compared;
margins are sums, exact only on views of one row per person; releases neither of
whose populations holds the other are not compared (a pair that moves two ends at once);
nested-looking decoys asked between the two halves of a pair take that request's checks,
so the pair is checked, and the alert raised, one request later (more decoys than the
checks follow raise it: ``cell_checks.MAX_PENDING``); releases of more than ``MAX_CELLS`` cells escape.
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
from sekisho.guard.lru import SizedLRU
from sekisho.guard.protect.cellkey import KEY_RANGE
from sekisho.instance import Instance

MAX_CELLS = 20_000   # released cells of a release recorded (larger tables are not compared)
MAX_CHECKS = 3       # new candidate pairs checked on the store per request (nested-looking first)
MAX_WITHIN = 8       # close pairs of one request's own boundaries checked before its answer
# pairs already checked, per user, snapshot and the two row SELECTs (-> differing cells)
_CHECKED = SizedLRU(8192, 1 << 20, lambda key, value: 64)
RECENT = 64          # earlier releases of the same family a new one is compared with
_DIGEST = np.dtype([("key", "<u8"), ("n", "<i8"), ("ck", "<i8"), ("margin", "<u1")])


class CellPair(NamedTuple):
    """Two releases to check on the store: their row SELECTs, and the group keys of each
    (positions) whose cells are compared — all of them, or a margin of the one with more."""
    new_sql: str
    old_sql: str
    new_keys: tuple[int, ...]
    old_keys: tuple[int, ...]
    old_id: int
    new_all: int = 0     # how many keys each release has (its cells)
    old_all: int = 0


def margins(keys: int) -> list[tuple[int, ...]]:
    """The key positions a release is recorded by: all its keys and, summed over the
    others, every smaller set of them (up to three keys; beyond, all but one). A table by
    block x sex x a key that holds one value is block x sex again — cells are matched by
    their values, so a key added to the second query of a pair does not hide it."""
    every = tuple(range(keys))
    if keys > 3:
        return [every] + [tuple(j for j in every if j != left) for left in every]
    return [tuple(j for j in every if mask >> j & 1) for mask in range((1 << keys) - 1, 0, -1)]


def digest(cells: dict, keys: int, k: int) -> bytes | None:
    """The release's cells of k or more contributors, and — when its rows are one per
    contributor (``hidden.ONE_ROW_EACH``) — those of its margins whose cells all have k or
    more (``margins``; contributors and cell keys summed), as sorted (key hash,
    contributors, cell key, margin) records; None when there are none or more than
    ``MAX_CELLS``."""
    n = np.asarray(cells.get(hidden.CONTRIBUTORS, ()), dtype=np.int64)
    ck = np.asarray(cells.get(hidden.CELL_KEY, np.zeros(len(n))), dtype=np.int64)
    columns = [cells.get(hidden.group_key(j)) for j in range(keys)]
    if not keys or not len(n) or any(c is None for c in columns) or len(n) > MAX_CELLS:
        return None
    values = [c.to_pylist() if hasattr(c, "to_pylist") else list(c) for c in columns]
    records: dict[tuple[int, int], list[int]] = {}
    # margins only of rows one per contributor: else a sum of cells counts some twice
    for number, margin in enumerate(margins(keys) if cells.get(hidden.ONE_ROW_EACH, False) else margins(keys)[:1]):
        for i in range(len(n)):
            key = _key_hash(tuple(values[j][i] for j in margin))
            total = records.setdefault((key, number), [0, 0, 1])
            total[0] += int(n[i])
            total[1] += int(ck[i])
            total[2] &= int(n[i]) >= k
    # a margin is known to the analyst only when every cell summed into it was released
    kept = [(key, number, t[0], t[1]) for (key, number), t in records.items() if t[0] >= k and t[2]]
    if not kept or len(kept) > MAX_CELLS * 4:
        return None
    out = np.empty(len(kept), dtype=_DIGEST)
    out["key"] = [r[0] for r in kept]
    out["margin"] = [r[1] for r in kept]
    out["n"], out["ck"] = [r[2] for r in kept], [r[3] % KEY_RANGE for r in kept]
    out.sort(order=["key", "margin"])
    return out.tobytes()


def _key_hash(key: tuple) -> int:
    # the values as a multiset: (block, sex) and (sex, block) are one cell
    text = "\x1f".join(sorted(f"{type(v).__name__}:{v!r}" for v in key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def close_cells(new: bytes, old: bytes, k: int, new_keys: int = 0, old_keys: int = 0
                ) -> tuple[int, bool, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """(cells of the same key whose contributors are 1..k-1 apart, or equal in number with
    another cell key — a group key that moved one person out and another in; whether the
    common cells all moved one way, or the totals are equal: nested-looking; the key
    positions of each side, ``margins``, of the closest such cell)."""
    a, b = np.frombuffer(new, dtype=_DIGEST), np.frombuffer(old, dtype=_DIGEST)
    # one record per key value on each side: the finest margin holding it
    a = a[np.unique(a["key"], return_index=True)[1]]
    b = b[np.unique(b["key"], return_index=True)[1]]
    _, ia, ib = np.intersect1d(a["key"], b["key"], assume_unique=True, return_indices=True)
    signed = a["n"][ia] - b["n"][ib]
    gap = np.abs(signed)
    is_close = ((gap >= 1) & (gap < k)) | ((gap == 0) & (a["ck"][ia] != b["ck"][ib]))
    close = int(is_close.sum())
    one_way = bool((signed >= 0).all() or (signed <= 0).all() or signed.sum() == 0)
    where = None
    if close:
        # the closest cell, of the finest margins among equals
        idx = np.flatnonzero(is_close)
        fineness = a["margin"][ia[idx]].astype(np.int64) + b["margin"][ib[idx]]
        i = int(idx[np.lexsort((fineness, gap[idx]))[0]])
        where = (margins(new_keys)[a["margin"][ia[i]]] if new_keys else (),
                 margins(old_keys)[b["margin"][ib[i]]] if old_keys else ())
    return close, one_way, where


def family(tree) -> str:
    """The views a row SELECT reads (at any depth) and its conditions (``conditions``), as
    ``<views digest>:<condition digests>``: releases of one family's views whose
    conditions are one within the other (``related``) are compared cell by cell."""
    views = sorted({t.name for t in tree.find_all(exp.Table)})
    return hashlib.blake2b(f"cells-v3/{views!r}".encode(), digest_size=16).hexdigest() + ":" + \
        ",".join(sorted(conditions(tree)))


_COMPARES = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.EQ, exp.NEQ)


def conditions(tree) -> frozenset[str]:
    """The conditions of a row SELECT — the conjuncts of every WHERE and JOIN ON — each
    with its literals left out, NOT dropped and every comparison one operator: ``>= v``,
    ``> v``, ``NOT (<= v)`` and ``BETWEEN`` of one column are one condition."""
    def blank(node):
        if isinstance(node, exp.Literal):
            return exp.Placeholder()
        if isinstance(node, exp.Not):
            return node.this
        if isinstance(node, _COMPARES):
            return exp.Anonymous(this="compare", expressions=sorted([node.left, node.right], key=lambda e: e.sql()))
        if isinstance(node, exp.Between):
            return exp.Anonymous(this="compare", expressions=[node.this, exp.Placeholder()])
        return node
    out = set()
    for node in tree.find_all(exp.Where, exp.Join):
        condition = node.this if isinstance(node, exp.Where) else node.args.get("on")
        if condition is None:
            continue
        for conjunct in condition.unnest().flatten() if isinstance(condition.unnest(), exp.And) \
                else [condition]:
            text = conjunct.unnest().copy().transform(blank).transform(blank).sql(dialect="duckdb")
            out.add(hashlib.blake2b(text.encode(), digest_size=4).hexdigest())
    return frozenset(out)


def related(a: str, b: str) -> bool:
    """Whether two families (``family``) are of the same views with the conditions of one
    all among the other's: the same question, a condition added or a constant moved."""
    views_a, _, conds_a = a.partition(":")
    views_b, _, conds_b = b.partition(":")
    if views_a != views_b:
        return False
    sa, sb = set(filter(None, conds_a.split(","))), set(filter(None, conds_b.split(",")))
    return sa <= sb or sb <= sa


def candidates(row_sql: str, cells: bytes, keys: int, earlier: list[tuple], k: int) -> list[CellPair]:
    """The pairs of a release (its digest ``cells`` by ``keys`` keys) with ``earlier``
    ones (``(id, row SQL, digest, keys)``, the most recent first) to check on the store:
    those with a close cell, nested-looking first, then the most recent."""
    ranked = []
    for order, (old_id, old_sql, old_cells, old_keys) in enumerate(earlier):
        close, one_way, where = close_cells(cells, old_cells, k, keys, old_keys)
        if close:
            ranked.append((not one_way, order, CellPair(row_sql, old_sql, *where, old_id, keys, old_keys)))
    return [pair for *_, pair in sorted(ranked, key=lambda r: r[:2])]


def record(instance: Instance, alerts, *, user: str, snapshot: str, shape: str, keys: int, row_sql: str,
           cells: bytes, k: int, now: float | None = None) -> list[CellPair]:
    """Record one release (one transaction) and return the candidate pairs with the
    user's recent releases of the same family (``shape``) and keys on this snapshot:
    nested-looking ones first, then the most recent, at most ``MAX_CHECKS``."""
    now = time.time() if now is None else now
    since = now - alerts.differencing_window_s
    state = _state(instance)
    con = state.con
    purge = state.purge_due("guard_cell_releases", now)
    with _transaction(con):
        views = shape.partition(":")[0]
        earlier = con.execute("SELECT id, row_sql, cells, keys, shape FROM guard_cell_releases WHERE user = ? "
                              "AND snapshot = ? AND shape >= ? AND shape < ? AND ts > ? AND row_sql != ? "
                              "ORDER BY id DESC LIMIT ?",
                              (user, snapshot, views + ":", views + ";", since, row_sql, RECENT)).fetchall()
        found = candidates(row_sql, cells, keys, [row[:4] for row in earlier if related(shape, row[4])], k)
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
    def side(sql: str, keys: tuple[int, ...], every: int) -> str:
        # the key values as a sorted list of text: the two may key the same values by
        # other columns, types or orders (a CASE for a column; a margin of more keys). A
        # margin is the sum of its cells: a person in two of them counts twice, as in
        # the sum an analyst can make (views of several rows per person)
        values = ", ".join(f'CAST("{hidden.group_key(j)}" AS VARCHAR)' for j in keys)
        cells = ", ".join(f'"{hidden.group_key(j)}"' for j in range(max(every, max(keys) + 1)))
        return (f"SELECT list_sort([{values}]) AS __key, __pid FROM "
                f"(SELECT DISTINCT {cells}, __pid FROM ({sql}) AS __r) AS __c")
    released = "SELECT __key FROM {side} GROUP BY __key HAVING COUNT(*) >= {k}"
    g = "__key"
    return (f"WITH __a AS ({side(pair.new_sql, pair.new_keys, pair.new_all)}), "
            f"__b AS ({side(pair.old_sql, pair.old_keys, pair.old_all)}), "
            f"__both AS ({released.format(side='__a', k=int(k))} INTERSECT "
            f"{released.format(side='__b', k=int(k))}), "
            "__d AS ((SELECT * FROM __a EXCEPT ALL SELECT * FROM __b) UNION ALL "
            "(SELECT * FROM __b EXCEPT ALL SELECT * FROM __a)), "
            "__in AS (SELECT NOT EXISTS (SELECT __pid FROM __a EXCEPT SELECT __pid FROM __b) AS a_in_b, "
            "NOT EXISTS (SELECT __pid FROM __b EXCEPT SELECT __pid FROM __a) AS b_in_a) "
            f"SELECT CASE WHEN (SELECT a_in_b OR b_in_a FROM __in) THEN COUNT(*) ELSE 0 END, "
            f"(SELECT a_in_b AND b_in_a FROM __in) FROM (SELECT {g}, COUNT(*) AS __n "
            f"FROM __d SEMI JOIN __both USING ({g}) GROUP BY {g}) AS __c WHERE __n < {int(k)}")


def differing(cursor, pair: CellPair, k: int) -> int:
    """The cells of ``pair`` that differ by 1..k-1 (``pair_sql``), except when the two
    count one population by keys that read other columns — moves by destination block
    beside origin block: persons whose two keys differ, not a constant moved (a cut point
    moved by one over one population reads one column and stays a pair)."""
    cells, same_population = cursor.execute(pair_sql(pair, k)).fetchone()
    if cells and same_population and \
            _key_columns(pair.new_sql, pair.new_keys) != _key_columns(pair.old_sql, pair.old_keys):
        return 0
    return int(cells)


def _key_columns(row_sql: str, keys: tuple[int, ...]) -> frozenset[str]:
    tree = sqlglot.parse_one(row_sql, read="duckdb")
    names = {hidden.group_key(j) for j in keys}
    return frozenset(c.name for p in tree.expressions if p.alias_or_name in names for c in p.find_all(exp.Column))


def in_episode(con, alerts, user: str, now: float) -> bool:
    """Whether the user's per-cell ``differencing`` episode is open: a pair confirmed (or
    too many left waiting, ``cell_checks``) within the window. One alert per episode."""
    return con.execute("SELECT 1 FROM guard_cell_pairs WHERE user = ? AND ts > ? LIMIT 1",
                       (user, now - alerts.differencing_window_s)).fetchone() is not None


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
        opened = in_episode(con, alerts, user, now)
        con.executemany("INSERT INTO guard_cell_pairs(user, old_id, cells, ts) VALUES (?, ?, ?, ?)",
                        [(user, pair.old_id, cells, now) for pair, cells in verified])
        if not opened:
            alert = {"alert": "differencing", "level": "cell", "cells": max(c for _, c in verified),
                     "window_s": alerts.differencing_window_s, "fingerprint": fingerprint}
            _pause(con, alerts, alert, user=user, now=now, raised_by=raised_by, pause=pause)
            found.append(alert)
    return found
