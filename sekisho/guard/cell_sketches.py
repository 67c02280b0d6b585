"""Population sketches: which candidate cell pairs (``cell_pairs``) can be nested,
decided without their store check.

Why: a candidate is confirmed only when one release's persons are all in the other's
(``cell_pairs.pair_sql``), and its store check is two scans of the row SELECTs. A sweep
over one family — the same table for many overlapping sets of 丁目, a literal moved step
by step — leaves dozens of candidates per request, nearly none nested: checked, they took
most of the guard's bookkeeping (the averaging-attack tests ran for minutes each); left
waiting, they held the analyst (``cell_checks.MAX_PENDING``) for pairs that could never
be confirmed.

Rule: a release's sketch counts its distinct persons per bucket of a hash of the person
(``BUCKETS``). When A's persons are all in B's, no bucket of A counts more than B's; a
pair where each side has a bucket counting more than the other's cannot be nested and
needs no store check. The test drops no nested pair (the counts are exact, no noise);
a pair that passes may still not be nested — the store check decides. Decoys asked to
take a request's checks (``cell_checks``) pass only if nested with the release they
were asked beside — and a nested pair with a close cell is what the store confirms: the
decoys would raise the alert themselves.

Cost: one scan per release that is in a candidate pair, once per snapshot and row SELECT
(an in-process LRU: after a restart they are counted again), at most ``MAX_SKETCHES``
per request in one statement; pairs whose sketches were not counted are checked on the
store as before (on budget, or waiting).
"""

from __future__ import annotations

import numpy as np

from sekisho.guard.lru import SizedLRU

BUCKETS = 2048       # hash buckets of a sketch (a release of n persons: ~n/2048 per bucket)
MAX_SKETCHES = 8     # releases sketched per request (one statement)
_SKETCHES = SizedLRU(2048, 16 << 20, lambda key, value: value.nbytes + len(key[1]))


def known(snapshot: str, row_sql: str) -> np.ndarray | None:
    """The sketch of a release already counted (None when not)."""
    return _SKETCHES.get((snapshot, row_sql))


def sketch_sql(row_sqls: list[str]) -> str:
    """One statement counting each row SELECT's distinct persons (``__pid``) per bucket:
    rows of (position in ``row_sqls``, bucket, persons)."""
    tagged = " UNION ALL ".join(f"SELECT DISTINCT {i} AS __t, __pid FROM ({sql}) AS __s{i}"
                                for i, sql in enumerate(row_sqls))
    return (f"SELECT __t, CAST(hash(__pid) % {BUCKETS} AS INTEGER) AS __b, COUNT(*) AS __n "
            f"FROM ({tagged}) AS __u GROUP BY ALL")


def count(cursor, snapshot: str, row_sqls: list[str]) -> dict[str, np.ndarray]:
    """Count the sketches of ``row_sqls`` on ``cursor`` (a cursor on ``snapshot``), keep
    and return them by row SELECT. Store errors are raised (nothing kept)."""
    rows = cursor.execute(sketch_sql(row_sqls)).fetchall()
    out = {sql: np.zeros(BUCKETS, dtype=np.int32) for sql in row_sqls}
    for tag, bucket, persons in rows:
        out[row_sqls[tag]][bucket] = persons
    for sql, sketch in out.items():
        _SKETCHES.put((snapshot, sql), sketch)
    return out


def can_be_nested(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the persons of one release can all be among the other's: some side
    counts no more than the other in every bucket."""
    return bool((a <= b).all() or (b <= a).all())


def clear() -> None:
    _SKETCHES.clear()
