"""Differential privacy mode (privacy unit: person).

* contributions are bounded in SQL (``sekisho.guard.cells``): at most ``max_groups``
  groups and ``max_rows`` rows per person; sums clamped to the policy bounds (never
  bounds computed from data);
* counts get two-sided geometric noise (diffprivlib ``Geometric``) with sensitivity
  ``max_rows`` (rows) or ``max_groups`` (distinct persons / households);
* sums use diffprivlib's ``Snapping`` mechanism (Mironov's defence against
  floating-point attacks on Laplace) on the sum expressed in units of its sensitivity;
  means are a noisy sum over a noisy count;
* group keys whose domain the policy declares public are densified (every domain cell
  is released, with noise); other keys go through Laplace partition selection: a cell
  is released only if its bounded person count plus Laplace(C/ε) exceeds
  1 + (C/ε)·ln(C/(2δ)) — a person touches at most C cells, so the probability that any
  of their cells appears only because of them is at most δ.

ε is split evenly between the released aggregates (a mean counts twice) and, when
needed, partition selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from diffprivlib.mechanisms import Geometric, Laplace, Snapping

from sekisho.guard import hidden
from sekisho.guard.protect.threshold import (COUNT_KINDS, Cells, ProtectionStats, counted, densify, nullable,
                                             number, size, take)

POPULATION_BOUND = 10_000_000  # |sum| <= this many sensitivities: a public bound on any cell


@dataclass(frozen=True)
class DPParams:
    epsilon: float
    delta: float
    max_rows: int
    max_groups: int


def partition_threshold(epsilon: float, delta: float, max_groups: int) -> float:
    return 1.0 + (max_groups / epsilon) * math.log(max_groups / (2.0 * delta))


def shares(aggregates, needs_selection: bool) -> int:
    n = sum(2 if a.kind == "avg" else 1 for a in aggregates)
    return n + (1 if needs_selection else 0) or 1


def _geometric(values: np.ndarray, epsilon: float, sensitivity: int) -> np.ndarray:
    mech = Geometric(epsilon=epsilon, sensitivity=int(sensitivity))
    return np.array([mech.randomise(int(v)) for v in values], dtype=np.int64)


def _snapped_sum(values: np.ndarray, epsilon: float, sensitivity: float) -> np.ndarray:
    if sensitivity <= 0:
        return values.astype(float)
    mech = Snapping(epsilon=epsilon, sensitivity=1.0, lower=-POPULATION_BOUND, upper=POPULATION_BOUND)
    return np.array([mech.randomise(float(v) / sensitivity) * sensitivity for v in values], dtype=float)


def protect_dp(cells: Cells, aggregates, domains: list[tuple | None], params: DPParams,
               sum_bounds: dict[int, tuple[float, float]]) -> tuple[Cells, ProtectionStats]:
    stats = ProtectionStats()
    n_keys = len(domains)
    dense, outside = densify(cells, domains)
    needs_selection = outside is None and n_keys > 0
    eps = params.epsilon / shares(aggregates, needs_selection)
    if outside is not None:
        stats.densified = True
        cells = dense  # values outside the public domain are never released in DP mode
    if needs_selection and size(cells):
        lap = Laplace(epsilon=eps, sensitivity=params.max_groups)
        noisy_n = np.array([lap.randomise(float(v)) for v in number(cells, hidden.CONTRIBUTORS)])
        cells = take(cells, noisy_n > partition_threshold(eps, params.delta, params.max_groups))
    count = size(cells)
    out: Cells = {hidden.group_key(j): cells[hidden.group_key(j)] for j in range(n_keys)}
    for j, agg in enumerate(aggregates):
        if agg.kind in COUNT_KINDS:
            raw = counted(cells, j, agg.kind)
            sensitivity = params.max_rows if agg.kind in ("count_rows", "count_nonnull") else params.max_groups
            out[hidden.protected_value(j)] = nullable(np.maximum(_geometric(raw, eps, sensitivity), 0), np.zeros(count, bool))
            continue
        lo, hi = sum_bounds[j]
        sensitivity = params.max_rows * max(abs(lo), abs(hi))
        noisy_sum = _snapped_sum(number(cells, hidden.total(j)), eps, sensitivity)
        if agg.kind == "sum":
            out[hidden.protected_value(j)] = nullable(noisy_sum, np.zeros(count, bool))
        else:
            noisy_count = _geometric(number(cells, hidden.nonnull(j), np.int64), eps, params.max_rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(noisy_count > 0, noisy_sum / np.maximum(noisy_count, 1), np.nan)
            out[hidden.protected_value(j)] = nullable(np.clip(mean, lo, hi), noisy_count <= 0)
    stats.cells = count
    return out, stats
