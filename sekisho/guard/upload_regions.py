"""The ``upload_decomposition`` alert: one region class averaged on two snapshots
(issue 15, class 6 (c); the regions and partitions are ``sekisho.guard.regions``).

``upload_differencing`` counts pairs of filtered *populations* asked before and after an
upload. An unfiltered tabulation records no population, and one population under many
shapes is one pair at most, so averaging a newcomer's region over many partitions on
each side of an upload went uncounted: block x sex split at 24 cut points of age gave a
newcomer's sex 0.77 against 0.51 (tests/test_guard_upload_decompositions.py).

Rule: per user, snapshot and region class, the weights of the distinct partitions
released in the window are summed (w, in splits in two). With the region itself released
once (noise variance V) and w splits in two (2V each), the best estimate of a region's
count on that snapshot has variance 2V / (2 + w); the change across two snapshots, the
sum of the two. When it falls below ``upload_decomposition_min_variance`` for a class on
this snapshot and another in the window, the pair is checked on the store, once
(``guard_region_checks``): if some region of the class gained or lost 1..k-1
contributors between them, the analyst holds sharp counts of a region on both sides of a
change of a few persons, and the alert is raised (once per episode; held if the policy
pauses on it). Regions that changed by k or more (a block in a month) or not at all are
no pair. Himeji: V = 9, threshold 8 — one release on each side leaves 18 (a newcomer's
sex guessed 56% right), an exact count on one side and one release on the other 9
(59%); splitting both sides three ways, or the second side once after averaging the
first, is checked.

Cost: an analyst who splits the same fine regions (町丁目 x sex, say) several ways on
each of two snapshots waits for an admin; block-level re-runs do not. Per request, on
the bookkeeping thread: one or two writes per partition (about 15 a query), and for each
class the request added to, its weights read again (index ranges) and its pieces' depth;
the store check runs at most ``MAX_CHECKS`` times per request. State: about 15 rows per
query kept for the window (62 days).
Residual: classes are compared by their items' text (ranges of one column canonical),
so one region written in other ways (``sex`` and ``sex = '男'`` as keys) is several
classes, each under the threshold.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

from sekisho.guard import regions
from sekisho.guard.alert_state import state_of as _state
from sekisho.guard.alerts import _pause, _transaction
from sekisho.instance import Instance

MAX_CHECKS = 4   # class pairs checked on the store per request

# the class's partitions and pieces per snapshot in the window, with whether (old, this) was checked
_WEIGHTS = """SELECT snapshot, SUM(weight) FROM guard_region_partitions
    WHERE user = ? AND class = ? AND ts > ? GROUP BY snapshot"""
_PIECES = """SELECT snapshot, family, piece, factor FROM guard_region_pieces WHERE user = ? AND class = ? AND ts > ?"""
_CHECKED = "SELECT old FROM guard_region_checks WHERE user = ? AND class = ? AND new = ?"
_ELSEWHERE = """SELECT EXISTS (SELECT 1 FROM guard_region_partitions WHERE user = ? AND class = ? AND snapshot != ?
    AND ts > ?) OR EXISTS (SELECT 1 FROM guard_region_pieces WHERE user = ? AND class = ? AND snapshot != ? AND ts > ?)"""


def class_weights(con, user: str, region_class: str, since: float) -> dict[str, float]:
    """A class's weight per snapshot: its partitions' weights plus, per column, the
    depth of its pieces (``regions.depth``)."""
    weights = {snapshot: float(w) for snapshot, w in con.execute(_WEIGHTS, (user, region_class, since))}
    families: dict[tuple[str, str], tuple[list[str], list[float]]] = {}
    for snapshot, family, piece, factor in con.execute(_PIECES, (user, region_class, since)):
        boxes, factors = families.setdefault((snapshot, family), ([], []))
        boxes.append(piece)
        factors.append(float(factor))
    for (snapshot, _), (boxes, factors) in families.items():
        # a cover needs two pieces at least: one piece alone weighs 1/2, like a dropped conjunct
        weights[snapshot] = weights.get(snapshot, 0.0) + min(regions.depth(boxes), len(boxes) / 2) * max(factors)
    return weights


def change_variance(weight_a: float, weight_b: float, variance: float) -> float:
    """The noise variance left on a region's change between two snapshots on which its
    class was split with total weights ``weight_a`` and ``weight_b`` (and the region
    itself released once on each): 2V / (2 + w) per side."""
    return 2 * variance / (2 + weight_a) + 2 * variance / (2 + weight_b)


class RegionRelease(NamedTuple):
    """One partition a boundary released: the class, the partition, its weight (or the
    piece it is: (column, intervals), weighed by depth), and what the store check runs:
    (row SQL, kept keys, kept conjuncts) for ``regions.region_sql``."""
    region_class: str
    partition: str
    weight: float
    source: tuple
    piece: tuple[str, str, float] | None = None


class RegionPair(NamedTuple):
    """A class averaged on two snapshots, to check on the store."""
    region_class: str
    old: str
    new: str
    source: tuple


def record_regions(instance: Instance, alerts, *, user: str, snapshot: str, releases: Iterable[RegionRelease],
                   variance: float, now: float | None = None) -> list[RegionPair]:
    """Record the partitions of a request (one transaction); return the class pairs
    (this snapshot and an earlier one) whose change variance fell below the policy's
    minimum and that were not checked yet, to check on the store. ``variance``: the
    perturbation's V."""
    now = time.time() if now is None else now
    since = now - alerts.upload_differencing_window_s
    least = alerts.upload_decomposition_min_variance
    state = _state(instance)
    con = state.con
    purge = state.purge_due("guard_region_partitions", now)
    pairs: list[RegionPair] = []
    with _transaction(con):
        source_of: dict[str, tuple] = {}   # the classes this request added a partition or piece to
        for release in releases:
            if release.piece is not None:
                key = (user, release.region_class, snapshot, release.piece[0], release.piece[1])
                added = con.execute("INSERT OR IGNORE INTO guard_region_pieces(user, class, snapshot, family, piece, "
                                    "factor, ts) VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, release.piece[2], now)).rowcount
                if not added:
                    con.execute("UPDATE guard_region_pieces SET ts = ?, factor = MAX(factor, ?) WHERE user = ? "
                                "AND class = ? AND snapshot = ? AND family = ? AND piece = ?",
                                (now, release.piece[2], *key))
            else:
                key = (user, release.region_class, snapshot, release.partition)
                added = con.execute("INSERT OR IGNORE INTO guard_region_partitions(user, class, snapshot, partition, "
                                    "weight, ts) VALUES (?, ?, ?, ?, ?, ?)", (*key, release.weight, now)).rowcount
                if not added:
                    added = con.execute("UPDATE guard_region_partitions SET ts = ?, weight = MAX(weight, ?) "
                                        "WHERE user = ? AND class = ? AND snapshot = ? AND partition = ? "
                                        "AND weight < ?", (now, release.weight, *key, release.weight)).rowcount
                    if not added:
                        con.execute("UPDATE guard_region_partitions SET ts = ? WHERE user = ? AND class = ? "
                                    "AND snapshot = ? AND partition = ?", (now, *key))
            if added:   # a class's weights change only when something is added to it
                source_of.setdefault(release.region_class, release.source)
        for region_class, source in source_of.items():
            if not con.execute(_ELSEWHERE, (user, region_class, snapshot, since, user, region_class, snapshot,
                                            since)).fetchone()[0]:
                continue   # on this snapshot only: no pair yet
            weights = class_weights(con, user, region_class, since)
            if len(weights) < 2:
                continue
            checked = {old for (old,) in con.execute(_CHECKED, (user, region_class, snapshot))}
            here = weights.get(snapshot, 0.0)
            for old, weight in weights.items():
                if old != snapshot and old not in checked and len(pairs) < MAX_CHECKS \
                        and change_variance(here, weight, variance) < least:
                    pairs.append(RegionPair(region_class, old, snapshot, source))
        if purge:
            con.execute("DELETE FROM guard_region_partitions WHERE ts < ?", (since,))
            con.execute("DELETE FROM guard_region_pieces WHERE ts < ?", (since,))
            con.execute("DELETE FROM guard_region_checks WHERE ts < ?", (since,))
    if purge:
        state.purged_at["guard_region_partitions"] = now
    return pairs


def confirm_regions(instance: Instance, alerts, *, user: str, fingerprint: str,
                    checked: Iterable[tuple[RegionPair, bool]], now: float | None = None,
                    raised_by: int | None = None, pause: bool = True) -> list[dict]:
    """Record the store checks (pair, changed); return ``[upload_decomposition]`` when a
    changed class opens an episode (no changed check of the user in the window before),
    holding the user if the policy pauses on it."""
    checked = list(checked)
    if not checked:
        return []
    now = time.time() if now is None else now
    con = _state(instance).con
    found: list[dict] = []
    with _transaction(con):
        episode = con.execute("SELECT 1 FROM guard_region_checks WHERE user = ? AND changed = 1 AND ts > ? LIMIT 1",
                              (user, now - alerts.upload_differencing_window_s)).fetchone()
        con.executemany("INSERT INTO guard_region_checks(user, class, old, new, changed, ts) VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(user, class, old, new) DO UPDATE SET changed = excluded.changed, ts = excluded.ts",
                        [(user, p.region_class, p.old, p.new, int(changed), now) for p, changed in checked])
        changed = [p for p, c in checked if c]
        if changed and episode is None:
            alert = {"alert": "upload_decomposition", "classes": len(changed),
                     "region": regions.describe(*changed[0].source),
                     "min_variance": alerts.upload_decomposition_min_variance,
                     "window_s": alerts.upload_differencing_window_s, "snapshots": [changed[0].old, changed[0].new],
                     "fingerprint": fingerprint}
            _pause(con, alerts, alert, user=user, now=now, raised_by=raised_by, pause=pause)
            found.append(alert)
    return found


def region_changed(pair: RegionPair, k: int, cursor) -> bool:
    """Whether some region of the class gained or lost 1..k-1 contributors between the
    two snapshots: the old snapshot's (region, ``__pid``) rows compared on the new one
    (``cursor(snapshot)``: a context manager giving a DuckDB cursor on it)."""
    row_sql, kept_keys, kept_conjuncts = pair.source
    sql = regions.region_sql(row_sql, kept_keys, kept_conjuncts)
    keys = ", ".join(f'"__g{j}"' for j in sorted(kept_keys))
    with cursor(pair.old) as cur:
        old = cur.execute(sql).to_arrow_table()
    changed = (f"WITH __a AS ({sql}) SELECT 1 FROM ((SELECT * FROM __a EXCEPT SELECT * FROM __sekisho_old) "
               "UNION ALL (SELECT * FROM __sekisho_old EXCEPT SELECT * FROM __a)) AS __d "
               f"{'GROUP BY ' + keys if keys else ''} HAVING COUNT(*) BETWEEN 1 AND {int(k) - 1} LIMIT 1")
    with cursor(pair.new) as cur:
        cur.register("__sekisho_old", old)
        return cur.execute(changed).fetchone() is not None
