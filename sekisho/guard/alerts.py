"""Probing and bulk-volume alerts. Counters live in ``state.sqlite`` so they survive
restarts and are shared by every process serving queries.

(Over 400 lines on purpose: about 80 are this docstring, the alerts' specification; the
code is one module because the counters, the recorded populations and the holds are
read and written together, in the one transaction of ``record_request`` or of a pair's
confirmation, over the same tables.)

* ``bulk``: cells returned by a user within the last hour above ``bulk_cells_per_hour``;
* ``near_duplicate``: queries with the same fingerprint (literals masked) within
  ``near_duplicate_window_s`` reaching ``near_duplicate_burst`` — the shape of
  differencing, tracker and averaging attacks;
* ``refusals``: refusals within ``refusal_window_s`` reaching ``refusal_burst``.

* ``differencing``: two filtered queries by the same user within
  ``differencing_window_s`` (a week) whose populations differ by 1..k-1 contributors — the
  signature of a differencing pair (``P AND age >= 40`` / ``>= 41``); the analyst sees
  no difference in the answer. Sizes only preselect: a population is recorded with its
  definition (snapshot id, the boundary's row SQL as executed), and the bookkeeping
  thread verifies the ``MAX_PAIRS`` closest pairs whose sizes are 1..k-1 apart on the
  store (symmetric difference of their ``__pid`` sets, each on its own snapshot), after
  this module's transaction; only a verified pair raises the alert
  (``confirm_differencing``, once per episode: none of the user's populations in the
  window was in a verified pair before). Unrelated populations of nearly equal size do
  not. Populations recorded without a definition are compared by size only.
* ``decomposition``: two close population *identities* (true size n and cell key: the
  same contributors, however the SQL is written; sizes within k - 1 of each other) each
  released under many distinct shapes within ``decomposition_window_s`` — one under
  ``decomposition_burst``, the other under at least half as many. A shape is the
  fingerprint plus the boundary's group keys and aggregates with their literals: each
  split of a population into parts is a fresh draw of consistent noise, and averaging
  enough of them gives the exact count; the exact counts of *two* populations that
  differ by a few persons give those persons' cell (a suppressed cell too, as the
  difference of two padded populations). One population tabulated in many ways — what
  every report notebook does with the current residents — is not an alert by itself:
  its exact size alone is a count of k or more persons.
* ``upload_differencing``: populations of one user on two *different* snapshots whose
  contributors differ by 1..k-1 (the same filter asked before and after an upload: only
  the few persons who arrived or left are in one and not the other), verified on the
  store like ``differencing``; ``upload_differencing_burst`` verified pairs within
  ``upload_differencing_window_s`` (an upload cycle, not minutes: uploads are monthly).
  One such pair is what a fresh noise draw per snapshot leaves to an attacker (the
  newcomer's cell moved by one more than the others, under two draws of the noise:
  D=5, V=9 make it the largest change ~56% of the time against 50%); averaging over many
  pairs (other pads around the newcomer's area, rephrasings) is what this stops.
  Populations are kept per (snapshot, row SQL) for the window, candidates are the
  ``MAX_PAIRS`` closest sizes on other snapshots.

* ``upload_decomposition`` (``sekisho.guard.upload_regions``, its own tables): one class of
  regions split into released parts on two snapshots until a region's change is sharp,
  and some region changed by 1..k-1 contributors — tabulations averaged across an upload.

An alert is raised when a counter first reaches its threshold inside the window (not on
every later request), and audited as type ``alert``.

Holds (decision of issue 15): in threshold mode consistent noise cannot stop averaging
over decompositions or range pairs (``P AND age >= 40`` / ``>= 41``) spread over many
queries, so detection has to *stop* the analyst. An alert named in ``pause_on`` (Himeji:
differencing, decomposition) puts the user on hold (``guard_holds``: since, alert, the
audit seq that raised it; written in the same transaction); ``Guard.query`` then refuses
them (``paused_for_review``, one primary-key read before any data is read) until an admin
runs ``sekisho users resume NAME`` (``guard.resume``), which also forgets the user's
recorded populations so that a continued attack pauses again. Roles with
``alert_holds: false`` (the reports service) are never held. The bookkeeping runs after
the answer, so a hold applies from the next query once recorded.
Cost: two overlapping populations differing by a few persons, queried within 10
minutes or each tabulated in many ways within an hour, pause an honest analyst until an
admin resumes them (one population in many tables does not). Residual risk: detection, not
prevention — an attacker who stays under the thresholds (fewer shapes, pairs spread
beyond the window) still sharpens estimates, and the hold itself is one data-dependent bit per review. DP mode is the formal defence.

Cost per request: one transaction (``record_request``) whose reads do not grow with the
user's traffic: the near-duplicate, refusal and close-population counts are index range
counts (populations: the two ranges just below and above, read up to ``MAX_PAIRS``
rows each when populations carry a definition; decompositions: one key
lookup and a range count capped at the burst, one row per identity and shape), and the
cells of the last hour are per-minute sums (``guard_cells``, kept in step with
``guard_requests`` in the same transaction) plus the rows of the one minute the window
starts in. Rows older than twice the longest window, which no counter reads, are purged
(in whole minutes) at most once a minute per connection (the populations' row SQL with
them: it is in the audit trail anyway, and ``state.sqlite`` is 0600, service-owned).
Verifying a pair costs one query on the store per pair (at most ``MAX_PAIRS`` per
request, only when sizes are close), on the bookkeeping thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable
from typing import NamedTuple

from sekisho.guard.alert_state import BUCKET_S, connect as _connect, minute_of as _minute, state_of as _state
# the holds alerts put users on: one API with the alerts (``sekisho.guard.holds``)
from sekisho.guard.holds import hold_of, holds, put_hold, resume  # noqa: F401
from sekisho.instance import Instance

_COUNTERS = """SELECT
    (SELECT COUNT(*) FROM guard_requests WHERE user = ? AND fingerprint = ? AND ts > ?),
    (SELECT COUNT(*) FROM guard_requests WHERE user = ? AND refused = 1 AND ts > ?),
    (SELECT COALESCE(SUM(cells), 0) FROM guard_cells WHERE user = ? AND minute > ?)
    + (SELECT COALESCE(SUM(cells), 0) FROM guard_requests WHERE user = ? AND ts > ? AND ts < ?)"""
# shapes that released one population identity within the window, counted up to the burst
_SHAPES = """SELECT COUNT(*) FROM (SELECT 1 FROM guard_decompositions
    WHERE user = ? AND population = ? AND pkey = ? AND ts > ? LIMIT ?)"""
# another identity of a size within k - 1 released under at least ? shapes in the window
_CLOSE_DECOMPOSED = """SELECT 1 FROM guard_decompositions
    WHERE user = ? AND ts > ? AND population > ? AND population < ? AND NOT (population = ? AND pkey = ?)
    GROUP BY population, pkey HAVING COUNT(*) >= ? LIMIT 1"""
# the closest recorded populations (with a definition) just below and above a size, in
# index order (user, population, ts): at most ``limit`` rows read per side
_CANDIDATES = """SELECT * FROM (SELECT id, population, snapshot, row_sql FROM guard_populations
    WHERE user = ? AND population > ? AND population < ? AND ts > ? AND row_sql IS NOT NULL
    ORDER BY population DESC, ts DESC LIMIT ?)
    UNION ALL SELECT * FROM (SELECT id, population, snapshot, row_sql FROM guard_populations
    WHERE user = ? AND population > ? AND population < ? AND ts > ? AND row_sql IS NOT NULL
    ORDER BY population, ts LIMIT ?)"""
MAX_PAIRS = 4   # close pairs verified on the store per request (the closest sizes)
# the user's populations on other snapshots whose size is within k - 1 (equal included: one
# arrival and one departure keep the size): the same row SQL first (the same question asked
# again), then the closest sizes (a rephrasing)
_UPLOAD_CANDIDATES = """SELECT id, population, snapshot, row_sql FROM guard_upload_populations
    WHERE user = ? AND population > ? AND population < ? AND snapshot != ? AND ts > ?
    ORDER BY row_sql != ?, ABS(population - ?), ts DESC LIMIT ?"""

def _close_count(con: sqlite3.Connection, user: str, since: float, population: int, k: int) -> int:
    """Recent populations of the user differing from ``population`` by 1..k-1
    (|q - p| < k and q != p, as the two open ranges p-k < q < p and p < q < p+k)."""
    return con.execute(
        "SELECT (SELECT COUNT(*) FROM guard_populations WHERE user = ? AND population > ? AND population < ? "
        "AND ts > ?) + (SELECT COUNT(*) FROM guard_populations WHERE user = ? AND population > ? "
        "AND population < ? AND ts > ?)",
        (user, population - k, population, since, user, population, population + k, since)).fetchone()[0]


def _differencing(alerts, fingerprint: str) -> dict:
    return {"alert": "differencing", "window_s": alerts.differencing_window_s, "fingerprint": fingerprint}


class Definition(NamedTuple):
    """A recorded population: its row in ``guard_populations``, the snapshot it was
    released on and the boundary's row-level SQL as executed (projects ``__pid``)."""
    id: int
    snapshot: str
    sql: str


class Pair(NamedTuple):
    """Two recorded populations of one user, sizes 1..k-1 apart (``gap``): a differencing
    pair if their contributors differ by 1..k-1 on the store (``confirm_differencing``)."""
    gap: int
    new: Definition
    old: Definition


class Found(list):
    """The alerts of a request (a list of dicts), ``pairs``: the close pairs that decide
    ``differencing`` once verified on the store (at most ``MAX_PAIRS``), and
    ``upload_pairs``: the close pairs across snapshots that count towards
    ``upload_differencing`` once verified."""
    pairs: list[Pair]
    upload_pairs: list[Pair]

    def __init__(self, alerts=(), pairs=(), upload_pairs=()):
        super().__init__(alerts)
        self.pairs = list(pairs)
        self.upload_pairs = list(upload_pairs)


def _identities(populations, fingerprint: str) -> tuple[list[int], list[tuple[int, int, str]],
                                                        list[tuple[str, str] | None]]:
    """Sizes (for ``differencing``), for populations given as ``(n, key[, shape])``,
    identities with the shape they were released under (for ``decomposition``; the shape
    defaults to the request's fingerprint), and for ``(n, key, shape, snapshot, row_sql)``
    the definition (else None: compared by size only)."""
    sizes, identities, definitions = [], [], []
    for p in populations:
        definition = None
        if isinstance(p, (tuple, list)):
            n, key = int(p[0]), int(p[1])
            identities.append((n, key, str(p[2]) if len(p) > 2 else fingerprint))
            if len(p) > 4:
                definition = (str(p[3]), str(p[4]))
        else:
            n = int(p)
        sizes.append(n)
        definitions.append(definition)
    return sizes, identities, definitions


def _candidates(con: sqlite3.Connection, user: str, since: float, population: int, k: int) -> list[tuple]:
    """The recorded populations (with a definition) closest in size to ``population``,
    1..k-1 apart: up to ``MAX_PAIRS`` on each side, as (gap, Definition)."""
    rows = con.execute(_CANDIDATES, (user, population - k, population, since, MAX_PAIRS,
                                     user, population, population + k, since, MAX_PAIRS)).fetchall()
    return [(abs(q - population), Definition(i, snap, sql)) for i, q, snap, sql in rows]


def record_request(instance: Instance, alerts, *, user: str, fingerprint: str, refused: bool, cells: int,
                   populations: Iterable = (), k: int | None = None,
                   now: float | None = None, raised_by: int | None = None, pause: bool = True) -> Found:
    """Record one request and the populations of its filtered parts, in one transaction;
    return the alerts it triggers (each a dict for the audit): the counter alerts, then
    ``differencing`` for a population that forms the first close pair in the window, then
    ``decomposition`` for a population identity reaching ``decomposition_burst`` shapes.
    A population is its size n, or ``(n, cell key[, shape])`` to count decompositions, or
    ``(n, cell key, shape, snapshot, row_sql)``: then it is recorded with its definition
    and ``differencing`` is not decided here: the close pairs it forms (the ``MAX_PAIRS``
    closest sizes of the request) are returned as ``Found.pairs``, for the caller to
    verify on the store outside this transaction (``confirm_differencing``).
    With ``pause`` (the user's role may be held), an alert named in ``alerts.pause_on``
    also puts the user on hold, in the same transaction (``raised_by``: the audit entry of
    the request; the alert says ``pause``)."""
    now = time.time() if now is None else now
    populations, identities, definitions = _identities(populations, fingerprint)
    if populations and k is None:
        raise ValueError("populations need k")
    state = _state(instance)
    con = state.con
    horizon = max(3600, alerts.near_duplicate_window_s, alerts.refusal_window_s)
    pop_horizon = max(3600, alerts.differencing_window_s)
    purge_requests = state.purge_due("guard_requests", now)
    purge_populations = bool(populations) and state.purge_due("guard_populations", now)
    purge_decompositions = bool(identities) and state.purge_due("guard_decompositions", now)
    close_counts: list[int] = []
    pairs: list[Pair] = []
    upload_pairs: list[Pair] = []
    upload_since = now - alerts.upload_differencing_window_s
    decomposed = 0
    found: list[dict] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute("INSERT INTO guard_requests(user, ts, fingerprint, refused, cells) VALUES (?, ?, ?, ?, ?)",
                    (user, now, fingerprint, int(refused), int(cells)))
        con.execute("INSERT INTO guard_cells(user, minute, cells) VALUES (?, ?, ?) "
                    "ON CONFLICT(user, minute) DO UPDATE SET cells = cells + excluded.cells",
                    (user, _minute(now), int(cells)))
        # the cells of rows with ts > now - 3600 are the whole minutes after the one the
        # window starts in, plus that minute's rows inside the window
        start = now - 3600
        first = _minute(start)
        dup, ref, bulk = con.execute(_COUNTERS, (
            user, fingerprint, now - alerts.near_duplicate_window_s, user, now - alerts.refusal_window_s,
            user, first, user, start, (first + 1) * BUCKET_S)).fetchone()
        for population, definition in zip(populations, definitions):
            window = now - alerts.differencing_window_s
            if definition is None:   # compared by size only
                close_counts.append(_close_count(con, user, window, population, int(k)))
                candidates = []
            else:
                candidates = _candidates(con, user, window, population, int(k))
            row = con.execute("INSERT INTO guard_populations(user, ts, population, fingerprint, snapshot, row_sql) "
                              "VALUES (?, ?, ?, ?, ?, ?)", (user, now, population, fingerprint,
                                                            *(definition or (None, None))))
            if candidates:
                new = Definition(row.lastrowid, *definition)
                pairs += [Pair(gap, new, old) for gap, old in candidates]
            if definition is not None:
                upload_pairs += _upload_candidates(con, user, upload_since, population, int(k), definition, now)
        since = now - alerts.decomposition_window_s
        burst = alerts.decomposition_burst
        half = max(burst // 2, 1)
        for population, key, shape in identities:
            seen = con.execute("SELECT ts FROM guard_decompositions WHERE user = ? AND population = ? "
                               "AND pkey = ? AND shape = ?", (user, population, key, shape)).fetchone()
            if seen is None or seen[0] <= since:   # a shape new in the window
                shapes = con.execute(_SHAPES, (user, population, key, since, burst)).fetchone()[0] + 1
                # the pair becomes decomposed when this identity reaches half the burst
                # while a close one has the burst, or reaches the burst while one has half
                other = burst if shapes == half else half if shapes == burst else None
                if other is not None and k is not None:
                    close = con.execute(_CLOSE_DECOMPOSED, (user, since, population - int(k), population + int(k),
                                                            population, key, other)).fetchone()
                    decomposed += close is not None
            con.execute("INSERT INTO guard_decompositions(user, population, pkey, shape, ts) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT(user, population, pkey, shape) DO UPDATE SET ts = MAX(ts, excluded.ts)",
                        (user, population, key, shape, now))
        # keep the tables small: nothing older than the longest window is ever counted
        if purge_requests:   # whole minutes, so guard_cells keeps summing exactly the rows kept
            cutoff = _minute(now - 2 * horizon)
            con.execute("DELETE FROM guard_requests WHERE ts < ?", (cutoff * BUCKET_S,))
            con.execute("DELETE FROM guard_cells WHERE minute < ?", (cutoff,))
        if purge_populations:
            con.execute("DELETE FROM guard_populations WHERE ts < ?", (now - 2 * pop_horizon,))
        if purge_decompositions:
            con.execute("DELETE FROM guard_decompositions WHERE ts < ?", (now - 2 * alerts.decomposition_window_s,))
        if purge_populations:
            con.execute("DELETE FROM guard_upload_populations WHERE ts < ?", (upload_since,))
            con.execute("DELETE FROM guard_upload_pairs WHERE ts < ?", (upload_since,))
        found = _found(alerts, fingerprint, refused, cells, dup, ref, bulk, close_counts, decomposed)
        pausing = [a for a in found if a["alert"] in alerts.pause_on] if pause else []
        if pausing:   # the first alert of a hold stays its reason until an admin resumes the user
            con.execute("INSERT INTO guard_holds(user, since, alert, raised_by) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(user) DO NOTHING", (user, now, pausing[0]["alert"], raised_by))
            for alert in pausing:
                alert["pause"] = True
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    if purge_requests:
        state.purged_at["guard_requests"] = now
    if purge_populations:
        state.purged_at["guard_populations"] = now
    if purge_decompositions:
        state.purged_at["guard_decompositions"] = now
    pairs = _closest(pairs)
    # a pair the window's differencing check verifies already is not counted twice
    checked = {(p.new.sql, p.old.snapshot, p.old.sql) for p in pairs}
    upload_pairs = [p for p in upload_pairs if (p.new.sql, p.old.snapshot, p.old.sql) not in checked]
    return Found(found, pairs, upload_pairs[:MAX_PAIRS])


def _upload_candidates(con: sqlite3.Connection, user: str, since: float, population: int, k: int,
                       definition: tuple[str, str], now: float) -> list[Pair]:
    """Record the population for ``upload_differencing`` (once per snapshot and row SQL;
    a repeat refreshes its time) and return its close pairs on other snapshots."""
    snapshot, sql = definition
    row = con.execute("INSERT INTO guard_upload_populations(user, ts, population, snapshot, row_sql) "
                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT(user, snapshot, row_sql) DO UPDATE SET ts = excluded.ts "
                      "RETURNING id", (user, now, population, snapshot, sql)).fetchone()
    new = Definition(row[0], snapshot, sql)
    rows = con.execute(_UPLOAD_CANDIDATES, (user, population - k, population + k, snapshot, since,
                                            sql, population, MAX_PAIRS)).fetchall()
    return [Pair(abs(q - population), new, Definition(i, snap, old_sql)) for i, q, snap, old_sql in rows]


def confirm_upload_differencing(instance: Instance, alerts, *, user: str, fingerprint: str,
                                pairs: Iterable[Pair], now: float | None = None, raised_by: int | None = None,
                                pause: bool = True) -> list[dict]:
    """Record ``pairs`` (verified on the store: contributors differing by 1..k-1 across
    snapshots); return ``[upload_differencing]`` when the user's verified pairs in the
    window reach ``upload_differencing_burst`` with these (once per episode: an admin's
    resume forgets the pairs), holding the user if the policy pauses on it."""
    pairs = list(pairs)
    if not pairs:
        return []
    now = time.time() if now is None else now
    con = _connect(instance)
    since = now - alerts.upload_differencing_window_s
    burst = alerts.upload_differencing_burst
    found: list[dict] = []
    with _transaction(con):
        count = "SELECT COUNT(*) FROM guard_upload_pairs WHERE user = ? AND ts > ?"
        before = con.execute(count, (user, since)).fetchone()[0]
        con.executemany("INSERT INTO guard_upload_pairs(user, new_id, old_id, ts) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(user, new_id, old_id) DO NOTHING",
                        [(user, p.new.id, p.old.id, now) for p in pairs])
        after = con.execute(count, (user, since)).fetchone()[0]
        if before < burst <= after:
            found.append({"alert": "upload_differencing", "pairs": after, "burst": burst,
                          "window_s": alerts.upload_differencing_window_s, "fingerprint": fingerprint})
            _pause(con, alerts, found[0], user=user, now=now, raised_by=raised_by, pause=pause)
    return found


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection):
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _pause(con: sqlite3.Connection, alerts, alert: dict, *, user: str, now: float, raised_by: int | None,
           pause: bool) -> None:
    """Inside the caller's transaction: hold ``user`` if the policy pauses on ``alert``
    (an existing hold keeps its first reason)."""
    if pause and alert["alert"] in alerts.pause_on:
        con.execute("INSERT INTO guard_holds(user, since, alert, raised_by) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(user) DO NOTHING", (user, now, alert["alert"], raised_by))
        alert["pause"] = True


def _closest(pairs: list[Pair]) -> list[Pair]:
    """The ``MAX_PAIRS`` closest sizes (the most recent first), each pair of definitions once."""
    chosen, seen = [], set()
    for pair in sorted(pairs, key=lambda p: (p.gap, -p.old.id)):
        key = (pair.new.snapshot, pair.new.sql, pair.old.snapshot, pair.old.sql)
        if key not in seen and len(chosen) < MAX_PAIRS:
            seen.add(key)
            chosen.append(pair)
    return chosen


def confirm_differencing(instance: Instance, alerts, *, user: str, fingerprint: str, pairs: Iterable[Pair],
                         now: float | None = None, raised_by: int | None = None,
                         pause: bool = True) -> list[dict]:
    """Record ``pairs``, verified on the store (contributors differing by 1..k-1), as
    differencing pairs; return ``[differencing]`` when they open an episode (no population
    of the user in the window is part of an earlier verified pair), else ``[]``. Like
    ``record_request``, an alert in ``pause_on`` puts the user on hold in the same
    transaction (at most a few rows are written; reads: one index range, stopping at the
    first row)."""
    pairs = list(pairs)
    if not pairs:
        return []
    now = time.time() if now is None else now
    con = _connect(instance)
    found: list[dict] = []
    with _transaction(con):
        episode = con.execute("SELECT 1 FROM guard_populations WHERE user = ? AND paired = 1 AND ts > ? LIMIT 1",
                              (user, now - alerts.differencing_window_s)).fetchone()
        ids = sorted({i for pair in pairs for i in (pair.new.id, pair.old.id)})
        con.execute(f"UPDATE guard_populations SET paired = 1 WHERE id IN ({', '.join('?' * len(ids))})", ids)
        if episode is None:
            found.append(_differencing(alerts, fingerprint))
            _pause(con, alerts, found[0], user=user, now=now, raised_by=raised_by, pause=pause)
    return found


def _found(alerts, fingerprint: str, refused: bool, cells: int, dup: int, ref: int, bulk: int,
           close_counts: list[int], decomposed: int) -> list[dict]:
    bulk_before = bulk - int(cells)
    found: list[dict] = []
    if dup == alerts.near_duplicate_burst:
        found.append({"alert": "near_duplicate", "count": dup, "window_s": alerts.near_duplicate_window_s,
                      "fingerprint": fingerprint})
    if refused and ref == alerts.refusal_burst:
        found.append({"alert": "refusals", "count": ref, "window_s": alerts.refusal_window_s})
    if bulk_before < alerts.bulk_cells_per_hour <= bulk:
        found.append({"alert": "bulk", "cells_last_hour": bulk, "threshold": alerts.bulk_cells_per_hour})
    for close in close_counts:
        if close == 1:  # the first pair in the window; later ones are part of the same episode
            found.append(_differencing(alerts, fingerprint))
    for _ in range(decomposed):
        found.append({"alert": "decomposition", "shapes": alerts.decomposition_burst,
                      "window_s": alerts.decomposition_window_s, "fingerprint": fingerprint})
    return found
