"""Per-cell status and accuracy of released values: what a reader needs to interpret each
number (issue 19).

Every aggregate value of a protected table carries, in hidden columns next to it:

* ``__st<j>`` its status — ``released``, ``suppressed_k`` (fewer contributors than k, or
  a count perturbed into 1..min_count-1: "few, maybe none"; an empty cell on a public
  domain is ``suppressed_k`` too, so zero and small stay indistinguishable) or
  ``suppressed_dominance`` (a sum or mean dominated by a few contributors), or
  ``widened`` (threshold mode: answered without conditions of the query that change the
  cell by fewer than k persons, maybe none — ``cell_widening``);
* ``__lo<j>`` / ``__hi<j>`` the accuracy of the released value, as an interval:

  - threshold counts: the cell-key bound, value ± D (``perturbation.max_noise``; the low
    end not below 0): the true count lies in it, always; a ``widened`` count: value ±
    (D + s·(k - 1 + D)), s the conditions not applied in the cell, so the count asked
    for lies in it;
  - threshold sums of a measure declared non-negative: value ± r·value with
    ``r = f·c/(1 - f·c)``, f the sum-noise fraction (``SUM_NOISE_FRACTION``) and c the
    share of the total the largest contributor may hold in a released cell (the NK rule's
    k for sensitive measures, 1 otherwise): noise <= f·top1 <= f·c·true <= r·released.
    Computed from the released value and public parameters only — never from the largest
    contribution itself, which the dominance rules protect. Other sums, ``widened`` sums
    and threshold means carry no interval (NULL);
  - DP counts and sums: the 95% interval of the discrete Laplace noise around the value
    (``dp_half_width``: the smallest t with P(|Z| <= t) >= 0.95, so its coverage is 95%
    or slightly more); DP means: from the noisy sum's and the noisy count's 97.5%
    intervals (a union bound: at least 95%), clipped to the measure's bounds.

Statuses are functions of what the NULL pattern already shows plus the one distinction
readers need (dominance vs k); accuracies are functions of released values and public
parameters. Neither adds a data-dependent quantity to the answer.
"""

from __future__ import annotations

import math

import numpy as np

RELEASED = "released"
SUPPRESSED_K = "suppressed_k"
SUPPRESSED_DOMINANCE = "suppressed_dominance"
# an aggregate above the boundaries over cells of which some were suppressed: computed
# without them (``protect.carry``)
PARTIAL = "partial"
# threshold mode: a cell answered without some conditions of the query that change it by
# fewer than k persons (maybe none; ``cell_widening``): released, with a count's interval
# widened to hold the count asked for, a sum's or mean's dropped
WIDENED = "widened"
STATUSES = (RELEASED, SUPPRESSED_K, SUPPRESSED_DOMINANCE, PARTIAL, WIDENED)

# accuracy kinds, as the summary names them per output column
CELL_KEY = "cell_key"            # ± D
SUM_RELATIVE = "sum_relative"    # ± r × value
DP_INTERVAL = "dp_95"            # 95% interval of the DP noise
NO_INTERVAL = "none"

CONFIDENCE = 0.95


def status_column(j: int) -> str:
    return f"__st{j}"


def low_column(j: int) -> str:
    return f"__lo{j}"


def high_column(j: int) -> str:
    return f"__hi{j}"


def statuses(suppressed_k: np.ndarray, dominated: np.ndarray | None = None) -> np.ndarray:
    """Status per cell: ``suppressed_k`` wins over ``suppressed_dominance``."""
    out = np.full(len(suppressed_k), RELEASED, dtype=object)
    if dominated is not None:
        out[dominated] = SUPPRESSED_DOMINANCE
    out[suppressed_k] = SUPPRESSED_K
    return out


def around(values: np.ndarray, half: np.ndarray | float, *,
           floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) = value ∓ half, NaN where the value is NaN (suppressed or absent)."""
    values = np.asarray(values, dtype=float)
    low, high = values - half, values + half
    if floor is not None:
        low = np.maximum(low, floor)
    return low, high


def nan_pair(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, np.nan), np.full(n, np.nan)


def sum_relative_bound(fraction: float, dominance_share: float) -> float:
    """r such that |noise| <= r·|released| for a non-negative sum (see the module doc)."""
    fc = fraction * dominance_share
    return fc / (1.0 - fc)


# ---- DP -----------------------------------------------------------------------------------------

def discrete_laplace_half_width(alpha: float, confidence: float = CONFIDENCE) -> int:
    """The smallest integer t with P(|Z| <= t) >= confidence for P(Z = z) ∝ α^|z|:
    P(|Z| > t) = 2α^(t+1)/(1+α)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    if alpha == 0.0:
        return 0
    tail = 1.0 - confidence
    t = max(math.ceil(math.log(tail * (1.0 + alpha) / 2.0) / math.log(alpha)) - 1, 0)
    # guard the floating-point edge both ways
    while 2.0 * alpha ** (t + 1) / (1.0 + alpha) > tail:
        t += 1
    while t > 0 and 2.0 * alpha ** t / (1.0 + alpha) <= tail:
        t -= 1
    return t


def interval_ratio(s_low, s_high, c_low, c_high, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The range of s/c over s in [s_low, s_high], c in [c_low, c_high] (c_low > 0),
    clipped to [lo, hi]; the whole [lo, hi] where c_low <= 0."""
    s_low, s_high = np.asarray(s_low, float), np.asarray(s_high, float)
    c_low, c_high = np.asarray(c_low, float), np.asarray(c_high, float)
    ok = c_low > 0
    safe_low = np.where(ok, c_low, 1.0)
    safe_high = np.where(ok, c_high, 1.0)
    corners = np.stack([s_low / safe_low, s_low / safe_high, s_high / safe_low, s_high / safe_high])
    low = np.where(ok, corners.min(axis=0), lo)
    high = np.where(ok, corners.max(axis=0), hi)
    return np.clip(low, lo, hi), np.clip(high, lo, hi)
