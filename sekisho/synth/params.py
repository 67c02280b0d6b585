"""Calibration of the synthetic city against Himeji's public figures.

Himeji (2020 census): 530,495 persons in 224,106 households; about 15,000 転入 and 15,000 転出,
4,000 births, 5,500 deaths and 20,000 転居 a year. Rates below are per current household over
the 5-year window, so every count scales with the population.
"""

from __future__ import annotations

import numpy as np

from sekisho.reference import HOUSEHOLD_TYPES, MUNICIPALITIES

HIMEJI_PERSONS = 530_495
HIMEJI_HOUSEHOLDS = 224_106
WINDOW_YEARS = 5
HOUSEHOLDS_PER_CHUNK = 8192  # fixed, so output depends on the seed and N only, never on memory

# 国勢調査 世帯の家族類型 shares (HOUSEHOLD_TYPES order)
TYPE_SHARES = np.array([0.35, 0.20, 0.26, 0.09, 0.05, 0.05])
# households leaving the city as a whole: mostly young singles and young families
DEPARTING_TYPE_SHARES = np.array([0.52, 0.16, 0.24, 0.06, 0.0, 0.02])
assert len(TYPE_SHARES) == len(HOUSEHOLD_TYPES)

# Relative propensity to have moved recently, by head age (band lower bounds).
MOBILITY_AGES = np.array([0, 25, 30, 35, 40, 50, 65, 75])
MOBILITY_WEIGHTS = np.array([1.0, 0.9, 0.65, 0.45, 0.28, 0.15, 0.08, 0.07])


def mobility(head_age: np.ndarray) -> np.ndarray:
    return MOBILITY_WEIGHTS[np.searchsorted(MOBILITY_AGES, head_age, side="right") - 1]


# per current household over the window
DEPART_RATE = 0.155         # whole households leaving (転出) per current household
STAY_TAU_YEARS = 6.0        # mobile households stay exp(tau) years: shapes arrival/departure dates
# Share of departing households that had arrived within the window, and arrivals still here
# per departing household: with exponential stays and equal arrival and departure rates these
# keep the yearly 転入 and 転出 counts flat across the window.
SHORT_STAY_SHARE = 1 - STAY_TAU_YEARS / WINDOW_YEARS * (1 - np.exp(-WINDOW_YEARS / STAY_TAU_YEARS))
ARRIVED_PER_DEPARTED = 1 - SHORT_STAY_SHARE
# Arrival dates of households still here decay with this scale back from the extract date. It is
# longer than STAY_TAU_YEARS because young heads can only have arrived after turning 18, which
# already pushes their arrivals late; 10 keeps the yearly 転入 count flat.
ARRIVAL_TAU_YEARS = 10.0
JOKKEN_SHARE = 0.04         # of arriving single-person households, registered by 職権記載 instead
MOVE_SCALE = 0.75           # P(at least one 転居 in the window) = scale * mobility
SECOND_MOVE = 0.2           # P(a second 転居 | one)
MOVE_SAME_BLOCK = 0.6       # a 転居 usually stays in the same 地域ブロック
DEPART_MOVED = 0.12         # of departing households, share with one 転居 before leaving
CHILD_LEAVES = 0.30         # P(an adult child left a family household, 転出) for heads aged 45-70
DEATH_RATE = 0.123          # deaths per current household
DEATH_SPOUSE_SHARE = 0.45   # deaths of someone whose widow(er) still lives in the city alone

# age at death (5-year bands from 0), by sex: male deaths are younger. Deaths under 20 are
# left out (about 20 a year in a city of Himeji's size) so no child dies "alone".
DEATH_AGES = {
    1: np.array([0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.4, 0.5, 0.8, 1.3, 2.0, 3.2, 5.0, 8.0,
                 11.5, 14.0, 17.0, 16.0, 11.0, 4.2, 0.7]),
    2: np.array([0.0, 0.0, 0.0, 0.0, 0.15, 0.15, 0.2, 0.3, 0.5, 0.8, 1.1, 1.6, 2.5, 4.0,
                 6.5, 9.5, 15.0, 22.0, 21.0, 11.0, 2.5]),
}
DEATH_MALE_SHARE = 0.51

# Where people come from / go to: weights over reference.MUNICIPALITIES (mostly 兵庫県)
_MUNI_WEIGHTS = {
    "加古川市": 8, "高砂市": 5, "たつの市": 5, "相生市": 1.5, "赤穂市": 1.5, "宍粟市": 1.5,
    "福崎町": 2, "太子町": 2.5, "市川町": 1, "神河町": 0.7, "神戸市": 10, "明石市": 4,
    "尼崎市": 1.5, "西宮市": 2, "宝塚市": 0.8, "三木市": 0.6, "加西市": 1.2, "加東市": 0.8,
    "豊岡市": 0.6, "稲美町": 0.6, "播磨町": 0.8, "上郡町": 0.6, "佐用町": 0.5,
    "大阪市": 7, "堺市": 1, "京都市": 2, "岡山市": 2.5, "倉敷市": 1, "東京都特別区部": 5,
    "横浜市": 1.5, "名古屋市": 1.5, "広島市": 1.5, "福岡市": 1.2, "札幌市": 0.4,
    "奈良市": 0.5, "和歌山市": 0.5, "鳥取市": 0.5, "高松市": 0.6, "松山市": 0.4, "那覇市": 0.3,
}
MUNI_CODES = np.array(list(MUNICIPALITIES))
_names = [MUNICIPALITIES[c][1] for c in MUNI_CODES]
MUNI_WEIGHTS_IN = np.array([_MUNI_WEIGHTS[n] for n in _names], dtype=float)
MUNI_WEIGHTS_IN /= MUNI_WEIGHTS_IN.sum()
# young adults leaving home head for the big cities more often
_big = {"大阪市": 2.0, "東京都特別区部": 2.5, "神戸市": 1.5, "京都市": 1.8}
MUNI_WEIGHTS_YOUNG = np.array([_MUNI_WEIGHTS[n] * _big.get(n, 1.0) for n in _names], dtype=float)
MUNI_WEIGHTS_YOUNG /= MUNI_WEIGHTS_YOUNG.sum()

# childcare (children not yet at school, resident at the extract date)
CERT_RATE_UNDER3 = np.array([0.20, 0.48, 0.58])  # 3号 uptake at ages 0, 1, 2
CERT_RATE_3PLUS = 0.90                            # 2号 or 1号 at ages 3-5
CERT_2GOU_SHARE = 0.58                            # of certified 3-5 year olds, need-based (2号)
PLACED = {"1号": 0.97, "2号": 0.95, "3号": 0.92}  # share placed in a facility
WITHDRAWN = 0.03                                  # placed children who left the facility
PREVIOUS_3GOU = 0.75                              # 2号 children who held a 3号 before turning 3
SAME_BLOCK_FACILITY = 0.8
# facilities at Himeji's size; scaled by N, with a floor so small cities still have each type
FACILITY_COUNTS = {"こども園": (50, 3), "公立幼稚園": (40, 2), "保育園": (45, 2), "保育所": (25, 2)}
TIGHT_BLOCK_COUNT = 2          # blocks whose capacity falls short of demand
TIGHT_FACTOR = 0.8

# resident tax
TAX_PER_CAPITA = 3_500
TAX_RATE_CITY = 0.06
TAXPAYER_HIGH_EARNER = 0.0004
TAXPAYER_LEVY_ONLY = 0.06
