"""Error bounds of Sekisho's DP mechanisms at a stated failure probability, computed in
the tests from the mechanisms' public parameters alone (ε, the contribution bounds, the
discrete Laplace scale), independently of the guard's own 95% intervals (which cover
only 95%: a test comparing many values with them fails by design).

The mechanisms (``sekisho/guard/protect/dp.py``): ``value + Z``, Z discrete Laplace with
``P(Z = z) ∝ α^|z|``, ``α = exp(-ε'/Δ)``, ε' >= ε(1 - 2^-20) (ε rounded down to 21
significant bits); ``P(|Z| > t) = 2α^(t+1)/(1+α)``. Sums are noised in fixed point:
grid ``u = 2^(⌊log2 Δ⌋ - 20)``, the sum rounded to the grid (error <= u/2) and discrete
Laplace noise of sensitivity ``ceil(Δ/u) + 1`` grid units added. Means are a noisy sum
over a noisy count, clipped to the measure's bounds."""

from __future__ import annotations

import math

FAILURE = 1e-6          # default per released value
EPSILON_LOSS = 2.0 ** -20
FIXED_POINT_BITS = 20


def dp_bound(epsilon_share: float, sensitivity: int, failure: float = FAILURE) -> int:
    """The smallest t with P(|Z| > t) <= ``failure`` for the discrete Laplace noise of
    ``epsilon_share`` and ``sensitivity`` (ε' >= ε(1 - 2^-20): the widest the guard may use)."""
    rate = epsilon_share * (1 - EPSILON_LOSS) / sensitivity      # -ln α
    alpha = math.exp(-rate)

    def tail(t: int) -> float:          # P(|Z| > t)
        return 2 * math.exp(-rate * (t + 1)) / (1 + alpha)

    t = max(math.ceil(math.log(2 / (failure * (1 + alpha))) / rate) - 1, 0)
    while tail(t) > failure:            # the floating-point edge, both ways
        t += 1
    while t > 0 and tail(t - 1) <= failure:
        t -= 1
    return t


def dp_sum_bound(epsilon_share: float, sensitivity: float, failure: float = FAILURE) -> float:
    """|released sum - clamped true sum| <= this with probability >= 1 - ``failure``:
    the fixed-point grid's rounding (u/2) plus the noise bound in grid units."""
    if sensitivity <= 0:
        return 0.0
    _, e = math.frexp(float(sensitivity))
    unit = math.ldexp(1.0, e - 1 - FIXED_POINT_BITS)
    return (dp_bound(epsilon_share, math.ceil(sensitivity / unit) + 1, failure) + 0.5) * unit


def dp_mean_range(true_sum: float, true_count: int, sum_bound: float, count_bound: int,
                  low: float, high: float) -> tuple[float, float]:
    """The range a released mean (noisy sum / noisy count, clipped to [low, high]) lies in
    when both noises are within their bounds; the whole [low, high] when the noisy count
    may be <= 0 (then the guard releases NULL or any clipped ratio)."""
    if true_count - count_bound <= 0:
        return low, high
    corners = [(true_sum + s) / (true_count + c) for s in (-sum_bound, sum_bound)
               for c in (-count_bound, count_bound)]
    return min(max(min(corners), low), high), max(min(max(corners), high), low)


def selection_threshold(epsilon_share: float, delta: float, max_groups: int) -> int:
    """The partition-selection threshold T: a cell of a key without a public domain is
    released when its noisy contributor count (scale C/ε') is >= T,
    ``T = 1 + ⌈ln(δ(1+α)/C) / ln α⌉``. Computed with the ε the guard is asked for (its
    ε' is at most 2^-20 smaller, which moves T by far less than the noise bound)."""
    alpha = math.exp(-epsilon_share / max_groups)
    return 1 + max(math.ceil(math.log(delta * (1 + alpha) / max_groups) / math.log(alpha) + 1e-9), 0)


def binomial_upper(n: int, p: float, failure: float = FAILURE) -> int:
    """The smallest m with P(Binomial(n, p) > m) <= ``failure``: how many of n independent
    values may fall outside intervals of coverage >= 1 - p (e.g. the guard's 95%)."""
    tail, m = 1.0, -1
    while tail > failure and m < n:
        m += 1
        tail -= math.comb(n, m) * p ** m * (1 - p) ** (n - m)
    return m
