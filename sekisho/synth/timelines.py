"""Sampling the dates and addresses a household's timeline is made of: addresses by
block population share, up to two 転居 in the window, registration dates before it,
birth dates from ages, and truncated exponential stays.

Apart from ``sekisho.synth.population`` because every kind of household (current,
departed, dissolved by a death) draws its timeline the same way; each function is one
distribution, vectorised over a chunk.
"""

from __future__ import annotations

import numpy as np

from sekisho.synth import params as P
from sekisho.synth.dates import DAYS_PER_YEAR, NEVER, add_years
from sekisho.synth.geography import Geography
from sekisho.synth.records import Window


class AddressSampler:
    """Samples (chome, gaiku, go) by block population share and chome weight."""

    def __init__(self, geo: Geography) -> None:
        self.geo = geo
        self.block_chome = [geo.chome_of_block(b) for b in range(len(geo.block_share))]
        self.block_cum = []
        for chomes in self.block_chome:
            w = geo.chome_weight[chomes]
            self.block_cum.append(np.cumsum(w) / w.sum())

    def blocks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.geo.block_share), size=n, p=self.geo.block_share)

    def in_blocks(self, rng: np.random.Generator, blocks: np.ndarray):
        u = rng.random(len(blocks))
        chome = np.empty(len(blocks), dtype=np.int64)
        for b, (chomes, cum) in enumerate(zip(self.block_chome, self.block_cum)):
            mask = blocks == b
            if mask.any():
                chome[mask] = chomes[np.minimum(np.searchsorted(cum, u[mask]), len(chomes) - 1)]
        gaiku = 1 + (rng.random(len(blocks)) * self.geo.chome_gaiku_count[chome]).astype(np.int64)
        go = 1 + (rng.random(len(blocks)) ** 1.5 * 30).astype(np.int64)
        return chome, gaiku, go

    def sample(self, rng: np.random.Generator, n: int):
        return self.in_blocks(rng, self.blocks(rng, n))

    def nearby(self, rng: np.random.Generator, chome: np.ndarray):
        """Another address, in the same block with probability MOVE_SAME_BLOCK."""
        same = rng.random(len(chome)) < P.MOVE_SAME_BLOCK
        blocks = np.where(same, self.geo.chome_block[chome], self.blocks(rng, len(chome)))
        return self.in_blocks(rng, blocks)


def head_index(hh: np.ndarray, n: int) -> np.ndarray:
    """Index of the first member (the head, or in a child-headed household the head child)."""
    return np.searchsorted(hh, np.arange(n))


def uniform_days(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Uniform integer day in [lo, hi] (requires lo <= hi)."""
    return lo + (rng.random(np.shape(lo)) * (hi - lo + 1)).astype(np.int64)


def pre_window_start(rng, window: Window, head_birth: np.ndarray) -> np.ndarray:
    """A registration date before the window, after the head turned 18 (at most 45 years back)."""
    adult = add_years(head_birth, 18)
    earliest = np.maximum(adult, window.start - int(45 * DAYS_PER_YEAR))
    earliest = np.minimum(earliest, window.start - 30)
    return uniform_days(rng, earliest, np.full_like(earliest, window.start - 1))


def timeline(rng, window, sampler: AddressSampler, n, start, last_day, p_move, p_second):
    """Current address plus up to two 転居. Move dates are uniform over the whole window (so
    the yearly 転居 count is flat) and kept only if after ``start`` and on or before ``last_day``."""
    chome, gaiku, go = sampler.sample(rng, n)
    a = uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    b = uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    one = rng.random(n) < p_move
    two = one & (rng.random(n) < p_second)
    # one move: a uniform date; two moves: the sorted pair of uniform dates
    first = np.where(two, np.minimum(a, b), a)
    second = np.maximum(a, b)
    valid1 = one & (first > start) & (first <= last_day)
    valid2 = two & valid1 & (second > first) & (second <= last_day)
    move1 = np.where(valid1, first, NEVER)
    move2 = np.where(valid2, second, NEVER)
    moves = (move1 != NEVER).astype(np.int64) + (move2 != NEVER)
    prev1 = sampler.nearby(rng, chome)
    prev2 = sampler.nearby(rng, prev1[0])
    levels = []
    for level in range(3):
        # level 0 is the earliest address; the last level in use is the current address
        pick = [np.where(moves - level >= 2, p2, np.where(moves - level == 1, p1, cur))
                for p2, p1, cur in zip(prev2, prev1, (chome, gaiku, go))]
        levels.append(pick)
    chome3 = np.stack([lv[0] for lv in levels])
    gaiku3 = np.stack([lv[1] for lv in levels])
    go3 = np.stack([lv[2] for lv in levels])
    return move1, move2, chome3, gaiku3, go3


def trunc_exp(rng, n: int, tau_days: float, upto) -> np.ndarray:
    """Days t in [0, upto] with density proportional to exp(-t / tau)."""
    upto = np.broadcast_to(np.asarray(upto, dtype=np.float64), (n,))
    u = rng.random(n)
    return np.floor(-tau_days * np.log1p(-u * (1 - np.exp(-upto / tau_days)))).astype(np.int64)


def birth_days(ref: np.ndarray, age_years: np.ndarray) -> np.ndarray:
    """Birth date of someone aged ``age_years`` (fractional) on ``ref``; at least one day old."""
    return ref - np.maximum(1, np.floor(age_years * DAYS_PER_YEAR)).astype(np.int64)
