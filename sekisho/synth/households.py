"""Household composition: members, their 続柄, sex and age, for each 国勢調査 family type.

Ages are drawn for the household head from type-specific distributions (5-year band
weights, tuned so that the whole city looks like Japan's 2020 census pyramid), then the
other members follow from the head: spouses a couple of years apart, children born to the
mother between 23 and 39, the head's parents 24-37 years older. Everything is vectorised
over all households of a type at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sekisho.reference import HOUSEHOLD_TYPES, RELATIONSHIPS

REL = {name: i for i, name in enumerate(RELATIONSHIPS)}
HH = {name: i for i, name in enumerate(HOUSEHOLD_TYPES)}
MALE, FEMALE = 1, 2
MAX_AGE = 104.9


def _bands(**weights: float) -> np.ndarray:
    """Weights over 5-year bands 0-4 .. 100-104 from keyword args like a20=9 (band 20-24)."""
    w = np.zeros(21)
    for key, value in weights.items():
        w[int(key[1:]) // 5] = value
    return w / w.sum()


# Head-of-household age distributions per type (tuned against the census pyramid).
AGE_SINGLE = _bands(a15=1.8, a20=8.0, a25=7.0, a30=4.8, a35=4.4, a40=4.8, a45=5.8, a50=6.0,
                    a55=5.5, a60=6.2, a65=9.5, a70=11.5, a75=9.5, a80=9.0, a85=7.5, a90=3.8,
                    a95=1.5, a100=0.30)
AGE_COUPLE = _bands(a20=0.4, a25=2.0, a30=2.5, a35=2.0, a40=2.0, a45=2.5, a50=3.5, a55=5.5,
                    a60=8.5, a65=14.0, a70=17.5, a75=15.0, a80=10.5, a85=5.5, a90=1.5, a95=0.3)
AGE_COUPLE_KIDS = _bands(a25=1.2, a30=5.0, a35=10.5, a40=15.0, a45=17.0, a50=15.0, a55=12.0,
                         a60=8.0, a65=6.0, a70=4.0, a75=2.0, a80=1.0)
AGE_SINGLE_PARENT = _bands(a25=1.5, a30=4.0, a35=7.0, a40=10.0, a45=12.0, a50=11.0, a55=9.0,
                           a60=8.0, a65=8.0, a70=9.0, a75=9.0, a80=8.0, a85=5.0, a90=2.0, a95=0.4)
AGE_THREE_GEN_MIDDLE = _bands(a30=5.0, a35=13.0, a40=18.0, a45=20.0, a50=17.0, a55=14.0, a60=9.0)
AGE_OTHER = _bands(a20=3.0, a25=5.0, a30=6.0, a35=7.0, a40=9.0, a45=10.0, a50=11.0, a55=11.0,
                   a60=10.0, a65=9.0, a70=8.0, a75=6.0, a80=4.0)


@dataclass
class Members:
    """One row per person: household index (within the batch), 続柄, sex, age in years (float)
    at the household's reference date, and whether they carry the household's family name."""

    hh: np.ndarray
    rel: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    own_family_name: np.ndarray  # True for non-relatives (続柄 その他) who keep their own name


class _Builder:
    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, hh, rel, sex, age, order: int, own_name=False) -> None:
        hh = np.asarray(hh, dtype=np.int64)
        n = len(hh)
        self.parts.append((
            hh,
            np.broadcast_to(np.asarray(rel, dtype=np.int8), (n,)).copy(),
            np.broadcast_to(np.asarray(sex, dtype=np.int8), (n,)).copy(),
            np.clip(np.asarray(age, dtype=np.float64), 0.0, MAX_AGE),
            np.broadcast_to(np.asarray(order, dtype=np.int8), (n,)).copy(),
            np.full(n, own_name, dtype=bool),
        ))

    def build(self) -> Members:
        hh, rel, sex, age, order, own = (np.concatenate(c) for c in zip(*self.parts))
        idx = np.lexsort((order, hh))
        return Members(hh[idx], rel[idx], sex[idx], age[idx], own[idx])


def _sample_age(rng: np.random.Generator, n: int, p: np.ndarray) -> np.ndarray:
    return rng.choice(len(p), size=n, p=p) * 5 + rng.random(n) * 5


def _sex(rng: np.random.Generator, p_male) -> np.ndarray:
    p_male = np.asarray(p_male, dtype=np.float64)
    return np.where(rng.random(p_male.shape) < p_male, MALE, FEMALE).astype(np.int8)


def _spouse_age(rng: np.random.Generator, head_age: np.ndarray, head_male: np.ndarray) -> np.ndarray:
    gap = rng.normal(2.2, 3.0, len(head_age))
    return np.maximum(np.where(head_male, head_age - gap, head_age + gap), 18.0 + rng.random(len(head_age)))


def _children(b: _Builder, rng: np.random.Generator, hh: np.ndarray, mother_age: np.ndarray,
              counts: np.ndarray, rel_first, rel_rest, order) -> None:
    """Add up to counts[i] children per household, born to a mother aged mother_age.

    Children who would not be born yet are dropped (the eldest always exists). ``rel_first``
    and ``rel_rest`` are the 続柄 of the eldest and of the others (scalars or per household).
    """
    n = len(hh)
    rel_first = np.broadcast_to(rel_first, (n,))
    rel_rest = np.broadcast_to(rel_rest, (n,))
    order = np.broadcast_to(order, (n,))
    # mother's age at the eldest's birth: 23..39, never after the mother's current age
    gap = 23.0 + rng.random(n) * (np.clip(mother_age, 23.5, 39.0) - 23.0)
    age = mother_age - gap
    # a very young mother (under 23): the eldest was born when she was 17 or later
    age = np.where(age >= 0, age, rng.random(n) * np.maximum(mother_age - 17.0, 0.1))
    for k in range(int(counts.max(initial=0))):
        if k > 0:
            age = age - rng.uniform(1.2, 5.0, n)
        keep = (counts > k) & (age >= 0)
        rel = rel_first if k == 0 else rel_rest
        b.add(hh[keep], rel[keep], _sex(rng, np.full(keep.sum(), 0.512)), age[keep], order[keep] + k)


def generate_members(rng: np.random.Generator, types: np.ndarray) -> Members:
    """Members of households whose family types are ``types`` (indexes into HOUSEHOLD_TYPES)."""
    b = _Builder()

    # 単独: young singles (male-heavy) and elderly singles (female-heavy, widowed)
    hh = np.flatnonzero(types == HH["単独"])
    age = _sample_age(rng, len(hh), AGE_SINGLE)
    p_male = np.select([age < 40, age < 65, age < 80], [0.64, 0.62, 0.34], 0.22)
    b.add(hh, REL["世帯主"], _sex(rng, p_male), age, 0)

    # 夫婦のみ
    hh = np.flatnonzero(types == HH["夫婦のみ"])
    age = _sample_age(rng, len(hh), AGE_COUPLE)
    male = rng.random(len(hh)) < 0.92
    b.add(hh, REL["世帯主"], np.where(male, MALE, FEMALE), age, 0)
    b.add(hh, np.where(male, REL["妻"], REL["夫"]), np.where(male, FEMALE, MALE),
          _spouse_age(rng, age, male), 1)

    # 夫婦と子供
    hh = np.flatnonzero(types == HH["夫婦と子供"])
    age = _sample_age(rng, len(hh), AGE_COUPLE_KIDS)
    male = rng.random(len(hh)) < 0.93
    spouse = _spouse_age(rng, age, male)
    b.add(hh, REL["世帯主"], np.where(male, MALE, FEMALE), age, 0)
    b.add(hh, np.where(male, REL["妻"], REL["夫"]), np.where(male, FEMALE, MALE), spouse, 1)
    kids = rng.choice(4, size=len(hh), p=[0.38, 0.43, 0.16, 0.03]) + 1
    _children(b, rng, hh, np.where(male, spouse, age), kids, REL["子"], REL["子"], 3)

    # ひとり親と子供: when the parent is old, the (adult) eldest child is usually the head
    hh = np.flatnonzero(types == HH["ひとり親と子供"])
    age = _sample_age(rng, len(hh), AGE_SINGLE_PARENT)
    female = rng.random(len(hh)) < np.where(age < 65, 0.85, 0.75)
    child_headed = age >= 72
    b.add(hh, np.where(child_headed, np.where(female, REL["母"], REL["父"]), REL["世帯主"]),
          np.where(female, FEMALE, MALE), age, np.where(child_headed, 2, 0))
    kids = rng.choice(3, size=len(hh), p=[0.60, 0.32, 0.08]) + 1
    _children(b, rng, hh, np.where(female, age, age - 2.0), kids,
              np.where(child_headed, REL["世帯主"], REL["子"]),
              np.where(child_headed, REL["兄弟姉妹"], REL["子"]),
              np.where(child_headed, 0, 3))

    # 三世代: (A) middle generation heads with their parents, (B) grandparent heads
    hh_all = np.flatnonzero(types == HH["三世代"])
    middle = rng.random(len(hh_all)) < 0.6
    hh = hh_all[middle]
    age = _sample_age(rng, len(hh), AGE_THREE_GEN_MIDDLE)
    male = rng.random(len(hh)) < 0.85
    spouse = _spouse_age(rng, age, male)
    b.add(hh, REL["世帯主"], np.where(male, MALE, FEMALE), age, 0)
    b.add(hh, np.where(male, REL["妻"], REL["夫"]), np.where(male, FEMALE, MALE), spouse, 1)
    kids = rng.choice(3, size=len(hh), p=[0.35, 0.45, 0.20]) + 1
    _children(b, rng, hh, np.where(male, spouse, age), kids, REL["子"], REL["子"], 3)
    parents = rng.choice(3, size=len(hh), p=[0.40, 0.45, 0.15])  # both / mother / father
    father_age = age + rng.uniform(25.0, 37.0, len(hh))
    mother_age = np.where(parents == 0, father_age - rng.normal(2.5, 2.0, len(hh)),
                          age + rng.uniform(24.0, 35.0, len(hh)))
    # the head's parents are alive and rarely centenarians
    has_father = (parents != 1) & ((father_age < 98) | (rng.random(len(hh)) < 0.05))
    has_mother = (parents != 2) & ((mother_age < 100) | (rng.random(len(hh)) < 0.1))
    b.add(hh[has_father], REL["父"], MALE, father_age[has_father], 2)
    b.add(hh[has_mother], REL["母"], FEMALE, mother_age[has_mother], 2)

    hh = hh_all[~middle]
    n = len(hh)
    age = rng.uniform(58.0, 86.0, n)
    male = rng.random(n) < 0.8
    b.add(hh, REL["世帯主"], np.where(male, MALE, FEMALE), age, 0)
    has_spouse = rng.random(n) < 0.7
    b.add(hh[has_spouse], np.where(male, REL["妻"], REL["夫"])[has_spouse],
          np.where(male, FEMALE, MALE)[has_spouse], _spouse_age(rng, age, male)[has_spouse], 1)
    child_age = age - rng.uniform(25.0, 36.0, n)
    child_male = rng.random(n) < 0.7
    b.add(hh, REL["子"], np.where(child_male, MALE, FEMALE), child_age, 2)
    has_in_law = rng.random(n) < 0.85
    in_law_age = child_age + rng.normal(0.0, 3.0, n)
    b.add(hh[has_in_law], REL["子の配偶者"], np.where(child_male, FEMALE, MALE)[has_in_law],
          in_law_age[has_in_law], 2)
    mother = np.where(child_male, np.where(has_in_law, in_law_age, child_age - 2.0), child_age)
    grandkids = rng.choice(3, size=n, p=[0.35, 0.45, 0.20]) + 1
    _children(b, rng, hh, mother, grandkids, REL["孫"], REL["孫"], 4)

    # その他: siblings, young head with a grandparent, couple with a parent, non-relatives
    hh_all = np.flatnonzero(types == HH["その他"])
    kind = rng.choice(4, size=len(hh_all), p=[0.35, 0.10, 0.40, 0.15])
    age_all = _sample_age(rng, len(hh_all), AGE_OTHER)
    age_all[kind == 1] = rng.uniform(19.0, 36.0, int((kind == 1).sum()))  # young head + grandparent
    age_all[kind == 2] = rng.uniform(35.0, 63.0, int((kind == 2).sum()))  # couple with a parent
    male_all = rng.random(len(hh_all)) < 0.6
    b.add(hh_all, REL["世帯主"], np.where(male_all, MALE, FEMALE), age_all, 0)
    sel = kind == 0
    n_sib = rng.choice(2, size=sel.sum(), p=[0.75, 0.25]) + 1
    sib_age = age_all[sel] + rng.uniform(-8, 8, sel.sum())
    b.add(hh_all[sel], REL["兄弟姉妹"], _sex(rng, np.full(sel.sum(), 0.45)), np.maximum(sib_age, 15), 1)
    two = n_sib == 2
    b.add(hh_all[sel][two], REL["兄弟姉妹"], _sex(rng, np.full(two.sum(), 0.45)),
          np.maximum(age_all[sel][two] + rng.uniform(-8, 8, two.sum()), 15), 2)
    sel = kind == 1
    young = age_all[sel]
    gp_female = rng.random(sel.sum()) < 0.8
    b.add(hh_all[sel], np.where(gp_female, REL["祖母"], REL["祖父"]), np.where(gp_female, FEMALE, MALE),
          np.minimum(young + rng.uniform(45.0, 62.0, sel.sum()), MAX_AGE), 1)
    sel = kind == 2
    sp = _spouse_age(rng, age_all[sel], male_all[sel])
    b.add(hh_all[sel], np.where(male_all[sel], REL["妻"], REL["夫"]),
          np.where(male_all[sel], FEMALE, MALE), sp, 1)
    p_female = rng.random(sel.sum()) < 0.75
    b.add(hh_all[sel], np.where(p_female, REL["母"], REL["父"]), np.where(p_female, FEMALE, MALE),
          age_all[sel] + rng.uniform(24.0, 36.0, sel.sum()), 2)
    sel = kind == 3
    b.add(hh_all[sel], REL["その他"], _sex(rng, np.full(sel.sum(), 0.5)),
          np.maximum(age_all[sel] + rng.uniform(-10, 10, sel.sum()), 18), 1, own_name=True)

    return b.build()
