"""The bookkeeping's reads of the store (``recording``): a cursor on a snapshot — the
guard's current one, or an older one opened read-only — and the ``differencing`` /
``upload_differencing`` population pairs verified on them.

Why an older connection is kept: after an upload a request's populations are compared
with those of the snapshot before it, request after request, and opening a snapshot
takes ~20 ms (the averaging-attack tests opened it 2,500 times). One is kept, of this
process, and closed once its snapshot is pruned (a pruned file is freed only when no
connection holds it) or the guard closes.
"""

from __future__ import annotations

import contextlib
import os
import threading

from sekisho.store import Store

# a snapshot the bookkeeping opens to verify a differencing pair (not the guard's current one)
VERIFY_MEMORY_LIMIT = "512MB"
VERIFY_THREADS = 1
_DISTINCT_PIDS = "SELECT DISTINCT __pid FROM ({}) AS __r"


class StoreChecks:
    """Store reads for the bookkeeping thread: ``current_snapshot()`` gives the guard's
    open Snapshot (or None)."""

    def __init__(self, store: Store, current_snapshot):
        self.store = store
        self._current_snapshot = current_snapshot
        self._lock = threading.Lock()
        self._older = None   # (snapshot, pid, connection): ``_older_connection``

    def verify_pairs(self, pairs, k: int) -> tuple[list, Exception | None]:
        """The close pairs whose contributors really differ by 1..k-1 (symmetric difference
        of their ``__pid`` sets on the store), and the first error met (a pair that could
        not be verified raises no alert; the caller audits the error). Across an upload
        the older populations' ``__pid`` sets are fetched first, each older snapshot opened
        once per request (a request pairs with several populations of one snapshot)."""
        verified, failure = [], None
        older, missing = self._older_populations(pairs)
        for pair in pairs:
            key = (pair.old.snapshot, pair.old.sql)
            if key in missing:
                failure = failure or missing[key]
                continue
            try:
                if 1 <= self._symmetric_difference(pair.new, pair.old, k, older.get(key)) < k:
                    verified.append(pair)
            except Exception as exc:   # store errors (a pruned snapshot, ...): audited, not raised
                failure = failure or exc
        return verified, failure

    def _older_populations(self, pairs) -> tuple[dict, dict]:
        """The ``__pid`` sets (Arrow tables) of the pairs' older populations recorded on
        another snapshot than the newer one's, by (snapshot, SQL); and the store errors of
        those that could not be fetched (a pruned snapshot, ...)."""
        wanted: dict[str, set[str]] = {}
        for pair in pairs:
            if pair.old.snapshot != pair.new.snapshot:
                wanted.setdefault(pair.old.snapshot, set()).add(pair.old.sql)
        tables, missing = {}, {}
        for sid, sqls in wanted.items():
            try:
                with self.cursor(sid) as cur:
                    for sql in sorted(sqls):
                        tables[(sid, sql)] = cur.execute(_DISTINCT_PIDS.format(sql)).to_arrow_table()
            except Exception as exc:
                missing.update({(sid, sql): exc for sql in sqls if (sid, sql) not in tables})
        return tables, missing

    def _symmetric_difference(self, new, old, k: int, old_table=None) -> int:
        """Contributors in exactly one of two recorded populations, counted up to k: one
        query on their snapshot, or across an upload against the older population's
        ``__pid`` set fetched from its snapshot (``old_table``) on the newer one."""
        other = _DISTINCT_PIDS.format(old.sql)
        if old.snapshot != new.snapshot:
            if old_table is None:
                raise ValueError("an older population's persons are needed to compare across an upload")
            other = "SELECT __pid FROM __sekisho_old"
        sql = (f"WITH __a AS ({_DISTINCT_PIDS.format(new.sql)}), __b AS ({other}) SELECT COUNT(*) FROM ("
               "(SELECT __pid FROM __a EXCEPT SELECT __pid FROM __b) UNION ALL "
               f"(SELECT __pid FROM __b EXCEPT SELECT __pid FROM __a) LIMIT {int(k)}) AS __d")
        with self.cursor(new.snapshot) as cur:
            if old.snapshot != new.snapshot:
                cur.register("__sekisho_old", old_table)
            return int(cur.execute(sql).fetchone()[0])

    @contextlib.contextmanager
    def cursor(self, sid: str):
        """A cursor on snapshot ``sid``: the guard's open connection if it is the current
        one, else the snapshot opened read-only through the store (StoreError if it is
        gone), with DuckDB's memory and threads limited; closed afterwards."""
        snap = self._current_snapshot()
        cur = snap.cursor() if snap is not None and snap.id == sid else self._older_connection(sid).cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _older_connection(self, sid: str):
        """A read-only connection on an older snapshot, kept open for the next request (the
        bookkeeping compares a request with populations of one older snapshot, and opening
        one takes ~20 ms): one at a time, of this process, and not once the snapshot is
        pruned (StoreError, as when it is opened)."""
        with self._lock:
            kept, self._older = self._older, None
        if kept is not None and (kept[0], kept[1]) == (sid, os.getpid()) and (self.store.snapshots_dir / sid).exists():
            with self._lock:
                self._older = kept
            return kept[2]
        if kept is not None and kept[1] == os.getpid():
            kept[2].close()
        con = self.store.connect(sid).con
        try:
            con.execute(f"SET memory_limit = '{VERIFY_MEMORY_LIMIT}'")
            con.execute(f"SET threads = {VERIFY_THREADS}")
        except Exception:
            con.close()
            raise
        with self._lock:
            self._older = (sid, os.getpid(), con)
        return con

    def forget_pruned(self) -> None:
        """Close the kept older connection if its snapshot was pruned."""
        kept = self._older
        if kept is not None and kept[1] == os.getpid() and not (self.store.snapshots_dir / kept[0]).exists():
            self.close()

    def close(self) -> None:
        with self._lock:
            kept, self._older = self._older, None
        if kept is not None and kept[1] == os.getpid():
            kept[2].close()
