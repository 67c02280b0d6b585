"""教育・保育施設 and 支給認定 (childcare certifications and placements).

Facilities: こども園 (1号・2号・3号), 公立幼稚園 (1号 only), 保育園 / 保育所 (2号・3号), with
capacities sized to the expected demand of their block. Two large blocks are deliberately
short of places, and one こども園 has a 1号 capacity of 0 while still taking 1号 children
(弾力運用) — occupancy there is +∞, which reports must handle.

Certifications: for every preschool child (not yet at school) resident at the extract date:
3号 for under-threes with a need for care, 2号 (need) or 1号 (education) from the third
birthday. Most certified children are placed in a facility of their own block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sekisho.reference import BLOCKS, CERT_TYPES, FACILITY_TYPES
from sekisho.synth import params as P
from sekisho.synth.dates import NEVER, add_years, age_at, from_ymd, month_start_on_or_after, ymd
from sekisho.synth.geography import Geography

# expected certifications per resident by 号 (measured on generated cities; used for capacities)
EXPECTED_PER_PERSON = {"1号": 0.0113, "2号": 0.0157, "3号": 0.0097}
PROVIDES = {
    "こども園": ("1号", "2号", "3号"),
    "公立幼稚園": ("1号",),
    "保育園": ("2号", "3号"),
    "保育所": ("2号", "3号"),
}
_FLAVOURS = ("ひまわり", "さくら", "わかば", "あおぞら", "みどり", "ひかり", "こばと", "つくし",
             "たんぽぽ", "すみれ", "なかよし", "めぐみ", "あけぼの", "すずらん", "のぞみ", "しらさぎ")
_RURAL_PREFIX = re.compile(r"^(安富町|家島町|香寺町|夢前町|林田町|御国野町|四郷町|花田町|別所町|豊富町|"
                           r"山田町|飾東町|的形町|大塩町|白浜町)(?=.)")


def town_of(chome_name: str) -> str:
    """Short place name for a facility: '飾磨区玉地１丁目' -> '玉地', '夢前町前之庄' -> '前之庄'."""
    name = re.sub(r"[０-９]+丁目$", "", chome_name)
    name = name.split("区", 1)[1] if "区" in name[:4] else name
    return _RURAL_PREFIX.sub("", name)


@dataclass
class Facilities:
    facility_id: list[str]
    name: list[str]
    type: np.ndarray          # index into FACILITY_TYPES
    block: np.ndarray         # index into BLOCKS
    chome: np.ndarray         # index into geography chome arrays
    capacity: np.ndarray      # (3, F) for 1号, 2号, 3号
    choice_p: np.ndarray      # (3, n_blocks, F): where a child of a block with a 号 is placed

    def __len__(self) -> int:
        return len(self.facility_id)


def build_facilities(rng: np.random.Generator, geo: Geography, population: int) -> Facilities:
    scale = population / P.HIMEJI_PERSONS
    n_blocks = len(BLOCKS)
    types, blocks = [], []
    for t, name in enumerate(FACILITY_TYPES):
        base, floor = P.FACILITY_COUNTS[name]
        count = max(floor, int(round(base * scale)))
        types += [t] * count
        blocks += list(rng.choice(n_blocks, size=count, p=geo.block_share))
    types = np.array(types)
    blocks = np.array(blocks)
    n = len(types)
    chome = np.array([rng.choice(geo.chome_of_block(b)) for b in blocks])

    # block-to-block distance (km) for "near my block" placement
    lat, lon = geo.block_lat, geo.block_lon
    dy = (lat[:, None] - lat[None, :]) * 110.95
    dx = (lon[:, None] - lon[None, :]) * 111.32 * np.cos(np.radians(34.8))
    dist = np.hypot(dx, dy)

    large = np.flatnonzero(geo.block_share >= 0.08)
    tight = rng.choice(large, size=min(P.TIGHT_BLOCK_COUNT, len(large)), replace=False)
    capacity = np.zeros((3, n), dtype=np.int64)
    for k, cert in enumerate(CERT_TYPES):
        provider = np.array([cert in PROVIDES[FACILITY_TYPES[t]] for t in types])
        demand = population * geo.block_share * EXPECTED_PER_PERSON[cert]
        # blocks without a provider send their children to the nearest block that has one
        has = np.array([(provider & (blocks == b)).any() for b in range(n_blocks)])
        served = demand.copy()
        for b in np.flatnonzero(~has):
            target = np.flatnonzero(has)[np.argmin(dist[b, has])]
            served[target] += served[b]
            served[b] = 0.0
        factor = rng.uniform(1.0, 1.2, n_blocks)
        factor[tight] = P.TIGHT_FACTOR
        for b in np.flatnonzero(has):
            members = np.flatnonzero(provider & (blocks == b))
            share = rng.lognormal(0.0, 0.25, len(members))
            cap = served[b] * factor[b] * share / share.sum()
            step = 5 if cap.mean() >= 20 else 1
            capacity[k, members] = np.maximum(step, np.round(cap / step) * step).astype(np.int64)

    # one こども園 in a large block with 1号 capacity 0 that still takes 1号 children
    kodomo = np.flatnonzero((types == FACILITY_TYPES.index("こども園")) & np.isin(blocks, large))
    if len(kodomo) == 0:
        kodomo = np.flatnonzero(types == FACILITY_TYPES.index("こども園"))
    zero_cap = int(rng.choice(kodomo))
    capacity[0, zero_cap] = 0

    choice_p = np.zeros((3, n_blocks, n))
    for k, cert in enumerate(CERT_TYPES):
        provider = np.array([cert in PROVIDES[FACILITY_TYPES[t]] for t in types])
        weight_cap = capacity[k].astype(float)
        if k == 0:
            providers = capacity[0][provider & (capacity[0] > 0)]
            weight_cap[zero_cap] = 0.5 * providers.mean() if len(providers) else 1.0
        weight_cap[~provider] = 0.0
        for b in range(n_blocks):
            near = np.where(blocks == b, 1.0, 0.15 * np.exp(-dist[b, blocks] / 4.0))
            w = weight_cap * near
            choice_p[k, b] = w / w.sum()

    ids, names, used = [], [], set()
    for i, (t, c) in enumerate(zip(types, chome)):
        town = town_of(str(geo.chome_name[c]))
        kind = FACILITY_TYPES[t]
        flavour = _FLAVOURS[int(rng.integers(len(_FLAVOURS)))]
        name = {"公立幼稚園": f"姫路市立{town}幼稚園", "保育所": f"姫路市立{town}保育所",
                "保育園": f"{flavour}{town}保育園", "こども園": f"認定こども園{town}{flavour}"}[kind]
        base, serial = name, 2
        while name in used:
            name = f"{base}第{serial}"
            serial += 1
        used.add(name)
        ids.append(f"F{i + 1:04d}")
        names.append(name)
    return Facilities(ids, names, types, blocks, chome, capacity, choice_p)


@dataclass
class Certifications:
    person: np.ndarray
    cert_type: np.ndarray      # index into CERT_TYPES
    cert_date: np.ndarray
    valid_from: np.ndarray
    valid_to: np.ndarray
    facility: np.ndarray       # index into facilities, -1 = not placed
    use_from: np.ndarray       # NEVER = empty
    use_to: np.ndarray


def _lag(rng, n, upto):
    return rng.integers(0, upto, n)


def _place(rng, facilities: Facilities, cert_type: np.ndarray, block: np.ndarray) -> np.ndarray:
    out = np.full(len(cert_type), -1)
    for k in range(3):
        for b in range(facilities.choice_p.shape[1]):
            mask = (cert_type == k) & (block == b)
            if mask.any():
                out[mask] = rng.choice(len(facilities), size=int(mask.sum()), p=facilities.choice_p[k, b])
    return out


def certifications(rng: np.random.Generator, extract: int, birth: np.ndarray, registered: np.ndarray,
                   is_current: np.ndarray, block: np.ndarray, facilities: Facilities) -> Certifications:
    """Certifications of preschool children resident at ``extract``; ``block`` per person."""
    y, m, _ = ymd(np.array([extract]))
    fy_start = from_ymd(np.where(m >= 4, y, y - 1), 4, 1)[0]
    first_preschool_birth = add_years(np.array([fy_start]), -6)[0] + 1  # born after 1 April, 6 years back
    child = np.flatnonzero(is_current & (birth >= first_preschool_birth))
    b, reg = birth[child], registered[child]
    n = len(child)
    age = age_at(b, extract)
    under3 = age < 3
    p = np.where(under3, P.CERT_RATE_UNDER3[np.minimum(age, 2)], P.CERT_RATE_3PLUS)
    certified = (rng.random(n) < p) & (~under3 | (b + 57 <= extract))
    kind = np.where(under3, 2, np.where(rng.random(n) < P.CERT_2GOU_SHARE, 1, 0))
    third = add_years(b, 3)
    # school starts the April after the fiscal year (Apr 2 - Apr 1) of the sixth birthday
    by, bm, bd = ymd(b)
    fy_birth = np.where(bm * 100 + bd >= 402, by, by - 1)
    school = from_ymd(fy_birth + 7, 4, 1)
    had_3gou = (kind == 1) & (rng.random(n) < P.PREVIOUS_3GOU) & (np.maximum(b + 57, reg) + 30 < third)

    eligible = np.where(kind == 2, b + 57, third)
    valid_from = np.minimum(np.maximum(eligible, reg) + _lag(rng, n, 45), extract)
    valid_from = np.where(had_3gou, np.maximum(third, reg), valid_from)
    cert_date = np.maximum(valid_from - _lag(rng, n, 30), reg)
    valid_to = np.where(kind == 2, third - 1, school - 1)
    placed_p = np.array([P.PLACED[c] for c in CERT_TYPES])[kind]
    use_from = np.where(had_3gou, valid_from, month_start_on_or_after(valid_from))
    placed = (rng.random(n) < placed_p) & (use_from <= extract)
    facility = np.where(placed, _place(rng, facilities, kind, block[child]), -1)
    withdrawn = placed & (rng.random(n) < P.WITHDRAWN) & (use_from < extract)
    use_to = np.where(withdrawn, use_from + (rng.random(n) * (extract - use_from)).astype(np.int64) + 1, NEVER)
    use_to = np.minimum(use_to, np.where(withdrawn, extract, NEVER))
    current = Certifications(child[certified], kind[certified], cert_date[certified], valid_from[certified],
                             valid_to[certified], facility[certified],
                             np.where(placed, use_from, NEVER)[certified], use_to[certified])

    # the 3号 certification a 2号 child held until the day before the third birthday
    prev = had_3gou & certified
    start = np.minimum(np.maximum(b + 57, reg) + _lag(rng, n, 45), third - 30)
    prev_use = month_start_on_or_after(start)
    prev_placed = prev & placed & (prev_use < third)
    previous = Certifications(
        child[prev], np.full(int(prev.sum()), 2), np.maximum(start - _lag(rng, n, 30), reg)[prev],
        start[prev], (third - 1)[prev], np.where(prev_placed, facility, -1)[prev],
        np.where(prev_placed, prev_use, NEVER)[prev], np.where(prev_placed, third - 1, NEVER)[prev])
    merged = Certifications(*(np.concatenate([getattr(previous, f), getattr(current, f)])
                              for f in Certifications.__dataclass_fields__))
    order = np.lexsort((merged.valid_from, merged.person))
    return Certifications(*(getattr(merged, f)[order] for f in Certifications.__dataclass_fields__))
