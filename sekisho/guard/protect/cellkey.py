"""Consistent cell-key perturbation (ABS/ONS method).

Every record carries a permanent key ``_rkey`` in 0..255. A cell's key is the sum of
its records' keys mod 256, so the same set of contributing records always gets the
same cell key, whatever query produced the cell. The perturbation table maps
(cell key, count) to a small integer change drawn from a zero-mean distribution on
``-D..D`` with variance ``V``; it is generated from the instance secret, so an analyst
cannot rebuild it, and the same cell therefore always gets the same noise: averaging
repeated or rephrased queries does not converge to the true value.

The guard builds one table per *snapshot* (``snapshot=``: the instance secret and the
snapshot id seed it): consistent within a snapshot, a fresh independent draw for every
cell after a data update. With one table for all snapshots, every cell an upload leaves
unchanged would keep its exact answer and only the cells of the persons who arrived (or
left) would move, which names their cell (issue 15). The record keys themselves stay
permanent: they never leave the service, and a fresh table alone makes the noise of an
unchanged cell independent across snapshots.

Magnitudes (sums) are perturbed by ``SUM_NOISE_FRACTION`` x the largest per-person
contribution x a keyed multiplier in ±[0.5, 1] chosen by the cell key, so the largest
contributor is always masked by at least half that fraction of their value.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

KEY_RANGE = 256
SMALL_COLUMNS = 32        # counts 0..31 get their own column; larger counts cycle through 32 more
SUM_NOISE_FRACTION = 0.10


def cell_key_sql(key_sum: str) -> str:
    """SQL for a cell key from ``key_sum`` (a SUM of record keys): mod ``KEY_RANGE`` as
    an INTEGER. DuckDB's SUM of integers is a HUGEINT, and its HUGEINT modulo is a slow
    long division: on BIGINT the cell keys of an 892-cell result cost 0.25 ms less (the
    cast cannot overflow: that would take 3.6e16 records)."""
    return f"CAST(CAST({key_sum} AS BIGINT) % {KEY_RANGE} AS INTEGER)"


def noise_distribution(max_noise: int, variance: float) -> dict[int, float]:
    """Zero-mean distribution on -D..D with the requested variance (p(d) ∝ exp(-λd²))."""
    if max_noise <= 0:
        return {0: 1.0}
    values = np.arange(-max_noise, max_noise + 1)
    cap = float(max_noise ** 2)  # the largest variance reachable on -D..D
    target = min(variance, cap * 0.999)

    def var(lam: float) -> float:
        w = np.exp(-lam * values ** 2)
        return float((w * values ** 2).sum() / w.sum())

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if var(mid) > target:
            lo = mid
        else:
            hi = mid
    w = np.exp(-((lo + hi) / 2) * values ** 2)
    w /= w.sum()
    return {int(v): float(p) for v, p in zip(values, w)}


class PerturbationTable:
    def __init__(self, secret: bytes, *, max_noise: int, variance: float, label: str = "sekisho",
                 snapshot: str | None = None):
        """``snapshot``: the id of the snapshot the table perturbs (the guard always gives
        it: one table per snapshot); ``None`` gives one table whatever the data, for tests
        of the method alone."""
        message = f"sekisho.ptable.v1:{label}:{max_noise}:{variance}"
        if snapshot is not None:
            message = f"sekisho.ptable.v2:{label}:{max_noise}:{variance}:snapshot={snapshot}"
        seed = hmac.new(secret, message.encode(), hashlib.sha256).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
        dist = noise_distribution(max_noise, variance)
        # each column holds exactly the distribution's frequencies over 256 keys
        # (symmetric rounding keeps the mean exactly zero), in a keyed random order
        column = []
        for v, p in sorted(dist.items()):
            if v > 0:
                continue
            n = int(round(p * KEY_RANGE)) if v < 0 else 0
            column += [v] * n + [-v] * n
        column += [0] * (KEY_RANGE - len(column))
        column = np.array(column[:KEY_RANGE], dtype=np.int64)
        self.count_table = np.stack([rng.permutation(column) for _ in range(2 * SMALL_COLUMNS)])
        magnitudes = rng.uniform(0.5, 1.0, size=(KEY_RANGE,)) * rng.choice([-1.0, 1.0], size=(KEY_RANGE,))
        self.sum_multiplier = magnitudes
        self.max_noise = max_noise
        # drawn last, so the release tables above are what they always were
        self.decision_table = np.stack([rng.permutation(column) for _ in range(2 * SMALL_COLUMNS)])

    @staticmethod
    def _column(counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64)
        return np.where(counts < SMALL_COLUMNS, counts, SMALL_COLUMNS + counts % SMALL_COLUMNS)

    def count_noise(self, cell_keys, counts, *, table: np.ndarray | None = None) -> np.ndarray:
        cell_keys = np.asarray(cell_keys, dtype=np.int64) % KEY_RANGE
        return (self.count_table if table is None else table)[self._column(counts), cell_keys]

    def perturb_counts(self, cell_keys, counts) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64)
        return np.maximum(counts + self.count_noise(cell_keys, counts), 0)

    def decision_counts(self, cell_keys, counts) -> np.ndarray:
        """Perturbed counts for the guard's own decisions (which condition a cell is
        answered without, which twins are answered alike): the same distribution, a table
        of its own. A decision on the release's noise would be known in advance for a set
        that is released: ``age <> a`` made FALSE changes a cell by all it counts, the
        whole cell where the target is not (a decision the attacker reads off the released
        count) and the cell without her where she is (a fresh draw) — so a cell released
        at k or more and then decided below k was hers, every time."""
        counts = np.asarray(counts, dtype=np.int64)
        return np.maximum(counts + self.count_noise(cell_keys, counts, table=self.decision_table), 0)

    def perturb_count(self, cell_key: int, count: int) -> int:
        """``perturb_counts`` for one cell, in plain integers (the population check asks
        for one value per query: numpy's per-call cost would be most of it)."""
        count, cell_key = int(count), int(cell_key) % KEY_RANGE
        column = count if count < SMALL_COLUMNS else SMALL_COLUMNS + count % SMALL_COLUMNS
        return max(count + int(self.count_table[column, cell_key]), 0)

    def perturb_sums(self, cell_keys, sums, top1, salt: int = 0) -> np.ndarray:
        keys = (np.asarray(cell_keys, dtype=np.int64) + 37 * salt) % KEY_RANGE
        sums = np.asarray(sums, dtype=float)
        top1 = np.abs(np.asarray(top1, dtype=float))
        return sums + SUM_NOISE_FRACTION * top1 * self.sum_multiplier[keys]
