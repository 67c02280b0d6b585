"""Differential privacy mode (privacy unit: person).

Contribution bounds (``DPParams``) come from the policy's declarations and the query
text, never from the data (chosen in ``sekisho.guard.protection.DPProtection``):

* a person-unique view (``record_key: person``), or a view whose records are identified
  by (person, C) (``record_key: {record: C}``) queried with ``WHERE C = <literal>``
  (``resident_tax`` for one ``tax_year``): one row and one group per person;
* unit rows (households): sensitivity 2 (``UNIT_DP_SENSITIVITY``);
* elsewhere (several records per person, joins): the policy-wide ``disclosure.dp``
  bounds, ``max_rows_per_person`` rows in at most ``max_groups_per_person`` groups.

The cells SQL (``sekisho.guard.cells``) enforces the bound (it skips the per-person
bounding only where the rows are already one per person); sums are clamped to the
policy bounds of the measure.

Mechanisms — all noise is exact discrete Laplace noise (the two-sided geometric
mechanism), sampled with integer arithmetic only (Canonne, Kamath & Steinke 2020,
"The discrete Gaussian for differential privacy", algorithm 2) from the operating
system's CSPRNG (``os.urandom``). No floating-point noise is ever added to a value, so
Mironov's floating-point attack on textbook Laplace (the set of reachable doubles
depends on the input) has nothing to work on:

* ``ε`` is first rounded *down* to a dyadic rational with at least 20 significant bits
  (``_ratio``): the mechanism then spends ε' <= ε, with ε' >= ε·(1 - 2^-20);
* counts: ``count + Z``, ``P(Z = z) ∝ exp(-ε'|z|/Δ)`` with Δ the count's sensitivity
  (rows per person, groups per person, 1 on person-unique views). Counts are released
  **as drawn, negative values included**: no clipping at 0, so every released count is
  an unbiased estimate of the true (bounded) count, ``E[count + Z] = count`` (clipping
  at 0 biased small counts upwards: +90 on 546 cells at ε = 0.1 before issue 18);
* sums, in fixed point: with ``u = 2^(⌊log2 Δ⌋ - 20)`` (Δ = rows per person × the
  measure's largest absolute bound) the clamped cell sum ``S`` is rounded to the integer
  ``round(S/u)`` (its sensitivity is ``ceil(Δ/u) + 1``, the +1 covering the rounding),
  discrete Laplace noise of that sensitivity is added and the result is released as
  ``(round(S/u) + Z)·u`` — a multiple of ``u`` (16 yen for a sensitivity of 2e7 yen),
  exact in a double. This replaces diffprivlib's ``Snapping`` applied on the sum in
  units of its sensitivity, whose power-of-two grid Λ >= noise scale rounded answers to
  multiples of ~2.4e9 yen: here the grid is 2^-20 of the sensitivity, the error is the
  Laplace error alone (variance ``2·e^(-ε'/Δu)/(1-e^(-ε'/Δu))² ≈ 2(Δ/ε)²``). Sums of an
  integer measure are exact in the store's doubles below 2^53; a fractional measure's
  floating-point summation error is not part of Δ (as in diffprivlib and SmartNoise);
  means are a noisy sum over a noisy count, clipped to the bounds (post-processing);
* group keys whose domain the policy declares public are densified (every domain cell
  is released, with noise; empty cells too, so a noisy count of an empty cell may be
  negative); other keys go through partition selection on the contributor count
  ``n`` (distinct persons, at most C = groups per person cells each): the cell is
  released when ``n + Z >= T``, ``Z`` discrete Laplace of scale ``C/ε'`` and
  ``T = 1 + ⌈ln(δ(1+α)/C) / ln α⌉``, ``α = e^(-ε'/C)`` (``partition_threshold``): a
  cell that exists only because of one person (n = 1) appears with probability
  ``α^(T-1)/(1+α) <= δ/C``, at most δ over their C cells. When the query's count *is*
  that contributor count (``COUNT(*)`` with one row per person, ``COUNT(DISTINCT
  person)``, unit counts), the released count is the very noisy value the selection
  compared (one draw, one share of ε — the standard thresholded-histogram mechanism);
  conditional on being released, a cell's count is then at least T, i.e. counts of
  cells near the threshold are biased upwards by the selection (not by any clipping),
  while cells of public keys carry no selection at all.

ε is split evenly between the noisy quantities: each released aggregate (a mean counts
twice), plus one share for the contributor count when partition selection needs it or
a released count is it (shared by both).
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

import numpy as np

from sekisho.guard import hidden
from sekisho.guard.protect.status import (CONFIDENCE, RELEASED, around, discrete_laplace_half_width, high_column,
                                          interval_ratio, low_column, status_column)
from sekisho.guard.protect.threshold import (COUNT_KINDS, Cells, ProtectionStats, counted, densify, nullable,
                                             number, size, take)

POPULATION_BOUND = 10_000_000   # |sum| <= this many sensitivities: a public bound on any cell
EPSILON_BITS = 20               # ε is rounded down to >= 20 significant bits (relative loss <= 2^-20)
FIXED_POINT_BITS = 20           # a sum's unit is 2^-20 .. 2^-21 of its sensitivity
_VECTOR_LIMIT = 1 << 56         # denominators below this are sampled in int64 numpy arrays
_K_LIMIT = 128                  # den * k stays below 2^63 while k < 128


@dataclass(frozen=True)
class DPParams:
    epsilon: float
    delta: float
    max_rows: int
    max_groups: int
    # every row is its own contributor (one row per person by the policy's declaration,
    # or one row per unit): row counts then equal the contributor count ``__n``
    rows_are_contributors: bool = False


# ---- exact discrete Laplace (integer arithmetic only) ----------------------------------------

def _ratio(epsilon: float, sensitivity: int) -> tuple[int, int]:
    """ε'/Δ as a reduced fraction ``num/den`` of integers, ε' <= ε the dyadic rational
    with EPSILON_BITS + 1 significant bits below ε (ε = m·2^e, ε' = ⌊m·2^(bits+1)⌋·2^(e-bits-1))."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    sensitivity = int(sensitivity)
    if sensitivity < 1:
        raise ValueError(f"sensitivity must be a positive integer, got {sensitivity!r}")
    _, e = math.frexp(epsilon)
    k = EPSILON_BITS + 1 - e                     # ε·2^k in [2^20, 2^21)
    a = math.floor(math.ldexp(float(epsilon), k))   # exact scaling by a power of two, then floor
    num, den = (a, (1 << k) * sensitivity) if k >= 0 else (a << -k, sensitivity)
    g = math.gcd(num, den)
    return num // g, den // g


def effective_epsilon(epsilon: float, sensitivity: int = 1) -> float:
    """The ε' the mechanisms actually spend for a requested ε (ε' <= ε)."""
    num, den = _ratio(epsilon, sensitivity)
    return num / den * sensitivity


def _bits(n: int) -> bytes:
    return os.urandom(n)


# Vectorised rounds run while more than _TAIL elements are unfinished; the few left are
# finished one by one with the same algorithm in Python integers (``secrets``): a numpy
# round costs about as much as a handful of scalar draws, and the number of rounds is
# set by the slowest element of the batch.
_TAIL = 8


def _uniform_below(n: np.ndarray) -> np.ndarray:
    """Uniform integers in [0, n_i) (1 <= n_i < 2^63) by rejection from CSPRNG bits."""
    n = np.asarray(n, dtype=np.int64)
    out = np.empty(len(n), dtype=np.int64)
    # frexp's exponent of float(n - 1) is >= the bit length of n - 1 (rounding can only
    # go up to the next power of two), so r < 2^width covers [0, n): rejection is uniform
    width = np.maximum(np.frexp((n - 1).astype(float))[1], 1).astype(np.uint64)
    raw = np.frombuffer(_bits(8 * len(n)), dtype=np.uint64)
    r = (raw >> (np.uint64(64) - width)).astype(np.int64)
    out[:] = r
    todo = np.flatnonzero(r >= n)
    while todo.size > _TAIL:
        raw = np.frombuffer(_bits(8 * todo.size), dtype=np.uint64)
        r = (raw >> (np.uint64(64) - width[todo])).astype(np.int64)
        ok = r < n[todo]
        out[todo[ok]] = r[ok]
        todo = todo[~ok]
    for i in todo:
        out[i] = secrets.randbelow(int(n[i]))
    return out


def _bernoulli_exp_scalar(num: int, den: int, k: int = 1) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num/den <= 1, continuing at step ``k``."""
    while secrets.randbelow(den * k) < num:
        k += 1
    return k % 2 == 1


def _bernoulli_exp(num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-num_i/den)) for 0 <= num_i <= den < 2^56: the first k for which
    Bernoulli(γ/k) fails (γ = num/den, k = 1, 2, ...) is odd with probability exp(-γ)
    (CKS 2020, algorithm 1)."""
    n = len(num)
    result = np.empty(n, dtype=bool)
    k = np.ones(n, dtype=np.int64)
    alive = np.arange(n)
    while alive.size > _TAIL and int(k[alive].max()) < _K_LIMIT:
        hit = _uniform_below(den * k[alive]) < num[alive]
        stopped = alive[~hit]
        result[stopped] = (k[stopped] % 2) == 1
        alive = alive[hit]
        k[alive] += 1
    for i in alive:
        result[i] = _bernoulli_exp_scalar(int(num[i]), den, int(k[i]))
    return result


def _geometric_exp_scalar(num: int, den: int) -> int:
    while True:
        u = secrets.randbelow(den)
        if _bernoulli_exp_scalar(u, den):
            break
    v = 0
    while _bernoulli_exp_scalar(1, 1):
        v += 1
    return (v * den + u) // num


def _geometric_exp(count: int, num: int, den: int) -> np.ndarray:
    """``count`` draws of Y with P(Y = y) = (1-α)·α^y, α = exp(-num/den), y >= 0
    (CKS 2020, algorithm 2: Y = ⌊(U + den·V)/num⌋ with U uniform on [0, den) accepted
    with probability exp(-U/den) and V geometric with ratio exp(-1))."""
    u = np.empty(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size > _TAIL:
        cand = _uniform_below(np.full(todo.size, den, dtype=np.int64))
        ok = _bernoulli_exp(cand, den)
        u[todo[ok]] = cand[ok]
        todo = todo[~ok]
    for i in todo:
        while True:
            c = secrets.randbelow(den)
            if _bernoulli_exp_scalar(c, den):
                u[i] = c
                break
    v = np.zeros(count, dtype=np.int64)
    alive = np.arange(count)
    while alive.size > _TAIL:   # V: successes of Bernoulli(exp(-1)) before the first failure
        hit = _bernoulli_exp(np.ones(alive.size, dtype=np.int64), 1)
        alive = alive[hit]
        v[alive] += 1
    for i in alive:
        while _bernoulli_exp_scalar(1, 1):
            v[i] += 1
    if count and int(v.max()) >= ((1 << 62) // den):   # probability ~ e^-64: exact Python integers
        return np.array([(int(vi) * den + int(ui)) // num for vi, ui in zip(v, u)], dtype=object)
    return (v * den + u) // num


def _discrete_laplace_scalar(num: int, den: int) -> int:
    return _geometric_exp_scalar(num, den) - _geometric_exp_scalar(num, den)


def discrete_laplace(count: int, epsilon: float, sensitivity: int) -> np.ndarray:
    """``count`` independent draws of Z with P(Z = z) ∝ exp(-ε'|z|/Δ) (ε' from ``_ratio``),
    exactly: Z = Y1 - Y2, two independent geometric draws (their difference is the
    two-sided geometric distribution). int64 (object integers if a draw could not fit)."""
    num, den = _ratio(epsilon, sensitivity)
    if den >= _VECTOR_LIMIT:   # tiny ε' with a large sensitivity: exact Python integers
        draws = [_discrete_laplace_scalar(num, den) for _ in range(count)]
        try:
            return np.array(draws, dtype=np.int64)
        except OverflowError:
            return np.array(draws, dtype=object)
    y = _geometric_exp(2 * count, num, den)
    return y[:count] - y[count:]


def discrete_laplace_variance(epsilon: float, sensitivity: int) -> float:
    """Var Z of ``discrete_laplace``: 2α/(1-α)², α = exp(-ε'/Δ)."""
    num, den = _ratio(epsilon, sensitivity)
    alpha = math.exp(-num / den)
    return 2.0 * alpha / (1.0 - alpha) ** 2


# ---- mechanisms ------------------------------------------------------------------------------

def partition_threshold(epsilon: float, delta: float, max_groups: int) -> int:
    """T such that a cell whose only contributor is one person (n = 1) passes
    ``n + Z >= T`` with probability α^(T-1)/(1+α) <= δ/C (Z discrete Laplace of scale C/ε')."""
    num, den = _ratio(epsilon, max_groups)
    alpha = math.exp(-num / den)
    m = math.log(delta * (1.0 + alpha) / max_groups) / (-num / den)
    return 1 + max(math.ceil(m + 1e-9), 0)


def _geometric(values: np.ndarray, epsilon: float, sensitivity: int) -> np.ndarray:
    """Two-sided geometric (discrete Laplace) mechanism on integer counts; no clipping."""
    values = np.asarray(values).astype(np.int64)
    return values + discrete_laplace(len(values), epsilon, int(sensitivity))


def fixed_point_unit(sensitivity: float) -> float:
    """The grid of a sum with this sensitivity: 2^(⌊log2 Δ⌋ - FIXED_POINT_BITS)."""
    _, e = math.frexp(float(sensitivity))      # Δ in [2^(e-1), 2^e)
    return math.ldexp(1.0, e - 1 - FIXED_POINT_BITS)


def _fixed_point_sum(values: np.ndarray, epsilon: float, sensitivity: float) -> np.ndarray:
    """Discrete Laplace on the sum in fixed-point units (see the module docstring)."""
    values = np.asarray(values, dtype=float)
    if sensitivity <= 0:
        return values.copy()
    unit = fixed_point_unit(sensitivity)
    units_sensitivity = math.ceil(sensitivity / unit) + 1    # /unit is exact (a power of two)
    bound = POPULATION_BOUND * units_sensitivity
    scaled = np.clip(np.rint(values / unit), -bound, bound).astype(np.int64)
    noisy = scaled + discrete_laplace(len(values), epsilon, units_sensitivity)
    return noisy.astype(float) * unit


def half_width(epsilon: float, sensitivity: int, confidence: float = CONFIDENCE) -> int:
    """Half-width t of the ``confidence`` interval of ``discrete_laplace(·, epsilon,
    sensitivity)``: P(|Z| <= t) >= confidence, t the smallest such integer."""
    num, den = _ratio(epsilon, sensitivity)
    return discrete_laplace_half_width(math.exp(-num / den), confidence)


def sum_half_width(epsilon: float, sensitivity: float, confidence: float = CONFIDENCE) -> float:
    """Half-width of the ``confidence`` interval of ``_fixed_point_sum``'s noise."""
    if sensitivity <= 0:
        return 0.0
    unit = fixed_point_unit(sensitivity)
    return half_width(epsilon, math.ceil(sensitivity / unit) + 1, confidence) * unit


def shares(aggregates, needs_selection: bool, shared: frozenset[int] = frozenset()) -> int:
    """Noisy quantities ε is split between: each aggregate not in ``shared`` (a mean
    twice), plus the contributor count when selection needs it or ``shared`` releases it."""
    n = sum(2 if a.kind == "avg" else 1 for j, a in enumerate(aggregates) if j not in shared)
    return n + (1 if (needs_selection or shared) else 0) or 1


def contributor_counts(aggregates, params: DPParams) -> frozenset[int]:
    """Aggregates that are, by the query and the declared bounds alone, the cell's
    contributor count ``__n`` with its sensitivity: COUNT(DISTINCT person), or COUNT(*)
    where every row is its own contributor. They are released from one noisy draw of
    ``__n`` (the one partition selection compares, if any)."""
    out = set()
    for j, agg in enumerate(aggregates):
        if agg.kind == "count_persons" or (agg.kind == "count_rows" and params.rows_are_contributors
                                           and params.max_rows == params.max_groups):
            out.add(j)
    return frozenset(out)


def protect_dp(cells: Cells, aggregates, domains: list[tuple | None], params: DPParams,
               sum_bounds: dict[int, tuple[float, float]]) -> tuple[Cells, ProtectionStats]:
    stats = ProtectionStats()
    n_keys = len(domains)
    dense, outside = densify(cells, domains)
    needs_selection = outside is None and n_keys > 0
    shared = contributor_counts(aggregates, params)
    eps = params.epsilon / shares(aggregates, needs_selection, shared)
    if outside is not None:
        stats.densified = True
        cells = dense  # values outside the public domain are never released in DP mode
    noisy_n = None
    if (needs_selection or shared) and size(cells):
        noisy_n = _geometric(number(cells, hidden.CONTRIBUTORS, np.int64), eps, params.max_groups)
        if needs_selection:
            keep = noisy_n >= partition_threshold(eps, params.delta, params.max_groups)
            cells, noisy_n = take(cells, keep), noisy_n[keep]
    count = size(cells)
    no_null = np.zeros(count, bool)
    out: Cells = {hidden.group_key(j): cells[hidden.group_key(j)] for j in range(n_keys)}
    for j, agg in enumerate(aggregates):
        # every value DP releases is released; its accuracy is the 95% interval of its noise
        out[status_column(j)] = np.full(count, RELEASED, dtype=object)
        if j in shared:
            out[hidden.protected_value(j)] = value = nullable(
                noisy_n if noisy_n is not None else np.zeros(0, np.int64), no_null)
            out[low_column(j)], out[high_column(j)] = around(value, half_width(eps, params.max_groups))
            continue
        if agg.kind in COUNT_KINDS:
            raw = counted(cells, j, agg.kind)
            sensitivity = params.max_rows if agg.kind in ("count_rows", "count_nonnull") else params.max_groups
            out[hidden.protected_value(j)] = value = nullable(_geometric(raw, eps, sensitivity), no_null)
            out[low_column(j)], out[high_column(j)] = around(value, half_width(eps, sensitivity))
            continue
        lo, hi = sum_bounds[j]
        sensitivity = params.max_rows * max(abs(lo), abs(hi))
        noisy_sum = _fixed_point_sum(number(cells, hidden.total(j)), eps, sensitivity)
        if agg.kind == "sum":
            out[hidden.protected_value(j)] = value = nullable(noisy_sum, no_null)
            out[low_column(j)], out[high_column(j)] = around(value, sum_half_width(eps, sensitivity))
        else:
            noisy_count = _geometric(number(cells, hidden.nonnull(j), np.int64), eps, params.max_rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(noisy_count > 0, noisy_sum / np.maximum(noisy_count, 1), np.nan)
            out[hidden.protected_value(j)] = value = nullable(np.clip(mean, lo, hi), noisy_count <= 0)
            # each of the two noisy quantities within its 97.5% interval: the mean within
            # this one with probability >= 95% (union bound; conservative)
            each = 1.0 - (1.0 - CONFIDENCE) / 2
            s_half = sum_half_width(eps, sensitivity, each)
            c_half = half_width(eps, params.max_rows, each)
            low, high = interval_ratio(noisy_sum - s_half, noisy_sum + s_half, noisy_count - c_half,
                                       noisy_count + c_half, lo, hi)
            null = np.isnan(value)
            out[low_column(j)], out[high_column(j)] = np.where(null, np.nan, low), np.where(null, np.nan, high)
    stats.cells = count
    return out, stats
