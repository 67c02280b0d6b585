"""個人住民税: one row per taxpayer and tax year (residents on 1 January of the year).

Taxable income is log-normal with medians by age and sex; income_levy is the city's 6%
of it (rounded down to 100 yen), per_capita_levy the 均等割. A few people have only the
均等割, and a handful earn tens or hundreds of millions, so dominance rules have work to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sekisho.synth import params as P
from sekisho.synth.dates import age_at, from_ymd

_AGE_EDGES = np.array([18, 20, 25, 35, 60, 65, 75])
# index: band (0: 18-19, 1: 20-24, 2: 25-34, 3: 35-59, 4: 60-64, 5: 65-74, 6: 75+), sex (1, 2)
_TAXPAYER_P = {1: np.array([0.12, 0.65, 0.90, 0.92, 0.80, 0.55, 0.35]),
               2: np.array([0.12, 0.62, 0.72, 0.70, 0.55, 0.30, 0.18])}
_MEDIAN_YEN = {1: np.array([0.9e6, 1.6e6, 2.6e6, 3.4e6, 2.4e6, 1.4e6, 1.1e6]),
               2: np.array([0.8e6, 1.4e6, 1.8e6, 1.6e6, 1.1e6, 0.8e6, 0.7e6])}


@dataclass
class TaxRows:
    person: np.ndarray
    tax_year: np.ndarray
    taxable_income: np.ndarray
    income_levy: np.ndarray
    per_capita_levy: np.ndarray


def resident_tax(rng: np.random.Generator, tax_years: tuple[int, ...], birth: np.ndarray, sex: np.ndarray,
                 registered: np.ndarray, removed: np.ndarray) -> TaxRows:
    n = len(birth)
    # person-level draws, shared by both years so a person's income is stable
    taxpayer_draw = rng.random(n)
    level = rng.normal(0.0, 0.7, n)
    high = rng.random(n) < P.TAXPAYER_HIGH_EARNER
    high_income = np.exp(rng.uniform(np.log(30e6), np.log(300e6), n))  # 30M-300M yen
    levy_only = rng.random(n) < P.TAXPAYER_LEVY_ONLY
    # at least one high earner per chunk, so even small test cities have a dominant income:
    # a working-age resident present in every tax year, made a full taxpayer
    first_jan1, last_jan1 = int(from_ymd(min(tax_years), 1, 1)), int(from_ymd(max(tax_years), 1, 1))
    age_first = age_at(birth, first_jan1)
    steady = np.flatnonzero((registered <= first_jan1) & (removed > last_jan1) & (age_first >= 30) & (age_first < 60))
    if len(steady) and not high[steady].any():
        chosen = steady[int(rng.integers(len(steady)))]
        high[chosen], taxpayer_draw[chosen], levy_only[chosen] = True, 0.0, False
    parts = []
    for year in tax_years:
        jan1 = int(from_ymd(year, 1, 1))
        age = age_at(birth, jan1)
        resident = (registered <= jan1) & (removed > jan1) & (age >= 18)
        band = np.searchsorted(_AGE_EDGES, np.maximum(age, 18), side="right") - 1
        p = np.where(sex == 1, _TAXPAYER_P[1][band], _TAXPAYER_P[2][band])
        median = np.where(sex == 1, _MEDIAN_YEN[1][band], _MEDIAN_YEN[2][band])
        income = median * np.exp(level + rng.normal(0.0, 0.12, n))
        income = np.where(high, high_income * np.exp(rng.uniform(0.0, 0.2, n)), income)
        taxable = np.where(levy_only, 0, np.floor(income / 1000) * 1000).astype(np.int64)
        rows = np.flatnonzero(resident & (taxpayer_draw < p))
        parts.append(TaxRows(rows, np.full(len(rows), year), taxable[rows],
                             (np.floor(taxable[rows] * P.TAX_RATE_CITY / 100) * 100).astype(np.int64),
                             np.full(len(rows), P.TAX_PER_CAPITA, dtype=np.int64)))
    merged = TaxRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in TaxRows.__dataclass_fields__))
    order = np.lexsort((merged.tax_year, merged.person))
    return TaxRows(*(getattr(merged, f)[order] for f in TaxRows.__dataclass_fields__))
