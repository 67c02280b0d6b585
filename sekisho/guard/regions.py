"""The regions a boundary's release partitions, for the ``upload_decomposition`` alert
(issue 15, class 6 (c)). Pure functions of the row SELECT as answered.

Why: consistent noise gives a cell the same draw however often and however it is asked,
so what gives a *new* draw of a region's count is a new partition of the region into
released parts — ``GROUP BY block, sex, age >= 40`` splits every (block, sex) region in
two, and so do ``WHERE age >= 40`` with ``WHERE age < 40``, or two FILTERed counts.
Averaging many partitions gives the region's exact count. An exact count of k or more
persons is no disclosure within one snapshot, but the exact counts of one region before
and after an upload are: their difference is whoever arrived or left.

A boundary's row SELECT (subqueries merged) has *items*: its group keys and the top-level
conjuncts of its WHERE. Dropping some of them leaves a region *class* — the FROM plus the
kept items; its cells are the regions — and the dropped items, with the boundary's
conditional aggregates, are the partition of those regions the query released. A
partition's *weight* is what it tells about a region's count in splits in two: 2 / parts
per region (counted on the release's own cells: a cut point as a group key weighs 1, the
町丁目 of a block ~0.2), times the share of the parts the query releases (a dropped WHERE
conjunct releases one part of two; so does one FILTERed count).

When every dropped conjunct is a range of one column (``age >= 40``, ``BETWEEN``, ``=``,
an IN list), the release is a *piece* of a region instead: a box over those columns.
Pieces of one family (the same columns, the same dropped keys) are weighed together by
their depth, the most pieces any point lies in (``depth``), times what the dropped keys
leave (2 / parts). ``WHERE age >= t`` with ``WHERE age < t`` for sixty cut points is
depth sixty; five disjoint yearly windows, or one filter per 異動 type and year, are
depth one — one partition, not five. Classes and
partitions are compared by their SQL text; conditions the influence rule left out are
already gone from the row SELECT as answered, so padding a query with conditions that
change nobody adds no items.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass
import itertools
import math
from itertools import combinations

import numpy as np
import pandas as pd

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.merge_subqueries import merge_subqueries

from sekisho.guard import hidden
from sekisho.guard.lru import SizedLRU
from sekisho.guard.sqltext import DIALECT

MAX_DROPPED = 3          # partitions drop at most this many items (parts multiply: more say little)
MAX_ITEMS = 12           # beyond this many items, partitions drop at most two
_CACHE = SizedLRU(1024, 8 * 2 ** 20, lambda key, items: 3 * len(key))
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Partition:
    """One region class of a release and the partition of its regions it released."""
    region_class: str        # hash of the class (FROM + kept items)
    partition: str           # hash of the dropped items and conditional aggregates
    weight: float            # in splits in two: 2 / parts x the share of parts released
    kept_keys: tuple[int, ...]        # group keys kept (``__g<j>``)
    kept_conjuncts: tuple[int, ...]   # WHERE conjuncts kept (their order in the row SELECT)
    # dropped conjuncts that are all ranges: (family, box, factor) — the family (columns
    # and dropped keys, JSON), the box (per column its intervals, JSON) and 2 / parts of
    # the dropped keys; weighed with the family's other pieces by depth, not by ``weight``
    piece: tuple[str, str, float] | None = None


@dataclass(frozen=True)
class _Items:
    base: str                                  # the row SELECT's FROM and joins
    keys: tuple[tuple[int, str], ...]          # (j, SQL) of ``__g<j>``
    conjuncts: tuple[str, ...]                 # top-level WHERE conjuncts
    ranges: tuple[tuple[str, list] | None, ...]  # per conjunct: (column, intervals) if a range
    conditional: tuple[str, ...]               # aggregate arguments that are filters (CASE/IF)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _flat(row_sql: str, tree: exp.Select | None = None) -> exp.Select:
    """The row SELECT (``tree`` if given: the plan's, read only; else parsed) with its
    derived tables merged where sqlglot can."""
    tree = tree if tree is not None else sqlglot.parse_one(row_sql, read=DIALECT)
    try:
        merged = merge_subqueries(tree.copy())
    except Exception:   # not mergeable: the outer SELECT's items only, the rest is its FROM
        return tree
    return merged if isinstance(merged, exp.Select) else tree


def _unaliased(tree: exp.Select) -> exp.Select:
    """Over one table, the items without the table's alias (``r.sex`` and ``sex`` are
    one key), so that an alias per query does not make a class per query."""
    from_ = tree.args.get("from_")
    if tree.args.get("joins") or from_ is None or not isinstance(from_.this, exp.Table):
        return tree
    tree = tree.copy()
    for column in tree.find_all(exp.Column):
        column.set("table", None)
    tree.args["from_"].this.set("alias", None)
    return tree


def _value(node: exp.Expression):
    """A literal's value (number or string), else None."""
    sign = 1
    if isinstance(node, exp.Neg):
        node, sign = node.this, -1
    if isinstance(node, exp.Literal):
        if node.is_string:
            return None if sign < 0 else node.this
        try:
            return sign * float(node.this)
        except ValueError:
            return None
    return None


# (lo, hi, lo_closed, hi_closed); None is unbounded
_FLIPPED = {exp.GT: exp.LT, exp.GTE: exp.LTE, exp.LT: exp.GT, exp.LTE: exp.GTE, exp.EQ: exp.EQ}


def _range(conjunct: exp.Expression) -> tuple[str, list] | None:
    """(column SQL, intervals) when the conjunct is a range of one column with
    literals of one type: a comparison, BETWEEN, or IN list (points); else None."""
    intervals = None
    if isinstance(conjunct, tuple(_FLIPPED)):
        op, column, literal = type(conjunct), conjunct.this, conjunct.expression
        if not isinstance(column, exp.Column):
            op, column, literal = _FLIPPED[op], literal, column
        value = _value(literal)
        if isinstance(column, exp.Column) and value is not None:
            intervals = [{exp.GT: (value, None, False, False), exp.GTE: (value, None, True, False),
                          exp.LT: (None, value, False, False), exp.LTE: (None, value, False, True),
                          exp.EQ: (value, value, True, True)}[op]]
    elif isinstance(conjunct, exp.Between) and isinstance(conjunct.this, exp.Column):
        column, lo, hi = conjunct.this, _value(conjunct.args["low"]), _value(conjunct.args["high"])
        if lo is not None and hi is not None and type(lo) is type(hi):
            intervals = [(lo, hi, True, True)]
    elif isinstance(conjunct, exp.In) and isinstance(conjunct.this, exp.Column) and conjunct.expressions:
        column, values = conjunct.this, [_value(v) for v in conjunct.expressions]
        if all(v is not None for v in values) and len({type(v) for v in values}) == 1:
            intervals = [(v, v, True, True) for v in sorted(set(values))]
    if intervals is None:
        return None
    return column.sql(dialect=DIALECT), [list(i) for i in intervals]


def _canonical(node: exp.Expression) -> str:
    """An item's text for comparing classes: a range of one column by its column and
    intervals (``block = 'A'``, ``block IN ('A')`` and ``'A' = block`` are one item; so are
    ``age >= 40`` and ``40 <= age``), anything else by its SQL."""
    found = _range(node)
    if found is None:
        return node.sql(dialect=DIALECT)
    column, intervals = found
    return f"{column} in {json.dumps(intervals, ensure_ascii=False)}"


def _items(row_sql: str, tree: exp.Select | None = None) -> _Items:
    with _CACHE_LOCK:
        hit = _CACHE.get(row_sql)
    if hit is not None:
        return hit
    tree = _unaliased(_flat(row_sql, tree))
    keys, conditional = [], []
    for projection in tree.expressions:
        name = projection.alias_or_name
        body = projection.this if isinstance(projection, exp.Alias) else projection
        if name.startswith(hidden.GROUP_KEY_PREFIX):
            keys.append((int(name[len(hidden.GROUP_KEY_PREFIX):]), _canonical(body)))
        elif name.startswith("__a") and body.find(exp.Case, exp.If) is not None:
            conditional.append(body.sql(dialect=DIALECT))
    where = tree.args.get("where")
    nodes = (list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]) if where is not None else []
    base = tree.copy()
    base.set("expressions", [exp.Star()])
    base.set("where", None)
    items = _Items(base.sql(dialect=DIALECT), tuple(keys), tuple(_canonical(c) for c in nodes),
                   tuple(_range(c) for c in nodes), tuple(sorted(set(conditional))))
    with _CACHE_LOCK:
        _CACHE.put(row_sql, items)
    return items


def key_codes(cells: dict, keys: int) -> list[np.ndarray]:
    """The release's group-key columns as integer codes (one value per non-empty cell),
    for the parts per region; NULL is a value of its own."""
    columns = [cells.get(hidden.group_key(j)) for j in range(keys)]
    if any(column is None for column in columns):
        return []   # not known: a dropped key counts as a split in two
    return [pd.factorize(np.asarray(column, dtype=object), use_na_sentinel=False)[0].astype(np.int64)
            for column in columns]


def _regions_of(codes: list[np.ndarray], kept: list[int]) -> int:
    """How many distinct regions the cells fall into when only the ``kept`` keys are kept."""
    if not kept or not codes or not len(codes[0]):
        return 1
    if len(codes[0]) <= 4096:   # small tables: a set of tuples is faster than numpy's sort
        return len(set(zip(*(codes[j].tolist() for j in kept))))
    combined = codes[kept[0]]
    for j in kept[1:]:
        combined = np.unique(combined * (int(codes[j].max()) + 1) + codes[j], return_inverse=True)[1]
    return len(np.unique(combined))


def partitions(row_sql: str, codes: list[np.ndarray], tree: exp.Select | None = None) -> list[Partition]:
    """The region classes the boundary's release partitions and with what weight.
    ``codes``: the release's group-key columns as integer codes (``key_codes``), one
    entry per non-empty cell; the parts per region are counted on them. ``tree``: the
    row SELECT as a tree when the plan has it (the query's text is parsed once, in
    planning), else ``row_sql`` is parsed."""
    items = _items(row_sql, tree)
    cells = len(codes[0]) if codes else 0
    entries = [("k", j, text) for j, text in items.keys] + [("w", i, text) for i, text in enumerate(items.conjuncts)]
    conditional = "\x01".join(items.conditional)
    most = MAX_DROPPED if len(entries) <= MAX_ITEMS else 2
    regions_of: dict[tuple[int, ...], int] = {}   # subsets that differ in conjuncts keep the same keys
    out: list[Partition] = []
    for size in range(0 if items.conditional else 1, min(most, len(entries)) + 1):
        for dropped in combinations(range(len(entries)), size):
            kept = [e for i, e in enumerate(entries) if i not in dropped]
            kept_keys = tuple(j for kind, j, _ in kept if kind == "k")
            dropped_keys = [entries[i][1] for i in dropped if entries[i][0] == "k"]
            dropped_conjuncts = [entries[i][1] for i in dropped if entries[i][0] == "w"]
            key_parts, released = 1.0, 1.0
            if dropped_keys:
                if kept_keys not in regions_of:
                    regions_of[kept_keys] = _regions_of(codes, [j for j in kept_keys if j < len(codes)])
                key_parts = max(cells / regions_of[kept_keys], 1.0) if cells else 2.0
            # the query releases the part inside each dropped conjunct, not the rest
            parts = key_parts * 2 ** len(dropped_conjuncts)
            released /= 2 ** len(dropped_conjuncts)
            if items.conditional:   # FILTERed counts: each is one part of a split in two
                parts *= 2
                released *= min(len(items.conditional), 2) / 2
            region_class = _digest(items.base, *sorted(f"{kind}:{text}" for kind, _, text in kept))
            partition = _digest(*sorted(f"{entries[i][0]}:{entries[i][2]}" for i in dropped), conditional)
            out.append(Partition(region_class, partition, min(1.0, 2.0 / parts) * released, kept_keys,
                                 tuple(i for kind, i, _ in kept if kind == "w"),
                                 _piece(items, dropped_conjuncts, [entries[i][2] for i in dropped
                                                                   if entries[i][0] == "k"], key_parts)))
    return out


def _piece(items: _Items, dropped_conjuncts: list[int], dropped_keys: list[str],
           key_parts: float) -> tuple[str, str, float] | None:
    """The release as a piece (see the module docstring), or None when a dropped conjunct
    is not a range, two are on one column, or the aggregates are conditional.
    ``key_parts``: what the dropped keys split a piece into."""
    ranges = [items.ranges[i] for i in dropped_conjuncts]
    if not ranges or items.conditional or any(r is None for r in ranges):
        return None
    ranges.sort(key=lambda r: r[0])
    columns = [column for column, _ in ranges]
    if len(set(columns)) != len(columns):
        return None
    family = json.dumps([columns, sorted(dropped_keys)], ensure_ascii=False)
    box = json.dumps([intervals for _, intervals in ranges], ensure_ascii=False)
    return family, box, min(1.0, 2.0 / max(key_parts, 1.0)) if dropped_keys else 1.0


MAX_PIECES = 256          # beyond this many pieces in a family, depth is not computed: each counts 1/2
MAX_CANDIDATES = 20_000   # points tried for the depth of boxes over several columns


@functools.lru_cache(maxsize=16384)
def _box(piece: str) -> tuple:
    """A piece's box, parsed once (pieces are read again at every request that adds to
    their class)."""
    return tuple(tuple(tuple(interval) for interval in column) for column in json.loads(piece))


def _positions(value_rank: dict, interval) -> tuple[int, int]:
    """An interval as the first and last of the positions 3r (just below the r-th end
    point), 3r+1 (at it), 3r+2 (just above it)."""
    lo, hi, lo_closed, hi_closed = interval
    start = 0 if lo is None else 3 * value_rank[lo] + (1 if lo_closed else 2)
    end = 3 * len(value_rank) - 1 if hi is None else 3 * value_rank[hi] + (1 if hi_closed else 0)
    return start, end


def depth(boxes: list[str]) -> float:
    """The most pieces (boxes: per column a union of intervals, JSON) any one point lies
    in: how many partitions of a region the pieces of one family can make up. Counted on
    the grid of positions just below, at and just above every end point, per column (a
    difference array, summed). Pieces of mixed literal types in a column, or a grid over
    ``MAX_CANDIDATES`` points, count 1/2 each (what a piece weighs alone)."""
    if len(boxes) > MAX_PIECES:
        return len(boxes) / 2
    parsed = [_box(b) for b in boxes]
    dims = len(parsed[0]) if parsed else 0
    if not parsed or len(parsed) > MAX_PIECES or any(len(b) != dims for b in parsed):
        return len(parsed) / 2
    ranks = []
    for d in range(dims):
        values = {v for b in parsed for lo, hi, _, _ in b[d] for v in (lo, hi) if v is not None}
        if len({type(v) for v in values}) > 1:
            return len(parsed) / 2
        ranks.append({v: r for r, v in enumerate(sorted(values))})
    shape = tuple(max(3 * len(r), 1) for r in ranks)
    if math.prod(shape) > MAX_CANDIDATES:
        return len(parsed) / 2
    grid = np.zeros(tuple(n + 1 for n in shape), dtype=np.int64)
    for box in parsed:
        # a box is the product of its columns' interval unions (disjoint within a column)
        for corner in itertools.product(*[[_positions(ranks[d], i) for i in box[d]] for d in range(dims)]):
            if any(start > end for start, end in corner):
                continue
            for signs in itertools.product((0, 1), repeat=dims):
                index = tuple(end + 1 if s else start for s, (start, end) in zip(signs, corner))
                grid[index] += (-1) ** sum(signs)
    for axis in range(dims):
        grid = np.cumsum(grid, axis=axis)
    return float(grid[tuple(slice(0, n) for n in shape)].max())


def region_sql(row_sql: str, kept_keys: tuple[int, ...], kept_conjuncts: tuple[int, ...]) -> str:
    """The contributors of every region of a class: ``SELECT DISTINCT <kept keys as
    __g<j>>, __pid`` over the row SELECT's FROM with only the kept conjuncts."""
    tree = _flat(row_sql).copy()
    projections = []
    for projection in tree.expressions:
        name = projection.alias_or_name
        if name == hidden.PID or (name.startswith(hidden.GROUP_KEY_PREFIX)
                                  and int(name[len(hidden.GROUP_KEY_PREFIX):]) in kept_keys):
            projections.append(projection)
    tree.set("expressions", projections)
    tree.set("distinct", exp.Distinct())
    where = tree.args.get("where")
    if where is not None:
        conjuncts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
        kept = [conjuncts[i] for i in kept_conjuncts]
        tree.set("where", exp.Where(this=exp.and_(*kept)) if kept else None)
    return tree.sql(dialect=DIALECT)


def describe(row_sql: str, kept_keys: tuple[int, ...], kept_conjuncts: tuple[int, ...]) -> str:
    """A class in words for the audit: its FROM, the keys and the conditions kept."""
    items = _items(row_sql)
    keys = [text for j, text in items.keys if j in kept_keys]
    conditions = [items.conjuncts[i] for i in kept_conjuncts]
    return " ".join([items.base.replace("SELECT * FROM ", "", 1)]
                    + ([f"GROUP BY {', '.join(keys)}"] if keys else [])
                    + ([f"WHERE {' AND '.join(conditions)}"] if conditions else []))
