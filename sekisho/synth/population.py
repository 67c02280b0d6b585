"""Residents and their 異動 history, one chunk of households at a time.

A chunk holds a fixed number of *current* households (resident at the extract date) and,
in proportion, the people who left during the window: households that moved away as a
whole (転出), adult children who left home (転出), and the dead (死亡) — either alone in a
household that dissolved, or the late spouse of someone still living in the city.

Each household has an address timeline (up to two 転居 inside the window) and a start date
(転入 in the window, or registration before it).

The timelines are drawn by ``sekisho.synth.timelines``; the 異動 that follow from them
by ``sekisho.synth.events``. Here: who lives in the city, who left and who died.
"""

from __future__ import annotations

import numpy as np

from sekisho.synth import params as P
from sekisho.synth.dates import DAYS_PER_YEAR, NEVER, add_years, age_at
from sekisho.synth.households import HH, REL, generate_members
from sekisho.synth.names import NAMES
from sekisho.synth.records import NO_MUNI, REASON_DEATH, REASON_OUT, Households, People, Window
from sekisho.synth.timelines import birth_days, head_index, pre_window_start, timeline, trunc_exp, uniform_days


def current_households(rng, window: Window, sampler, n_households: int, persons_cap: int | None):
    """Households resident at the extract date; truncated to ``persons_cap`` persons if given."""
    types = rng.choice(len(P.TYPE_SHARES), size=n_households, p=P.TYPE_SHARES)
    m = generate_members(rng, types)
    if persons_cap is not None and persons_cap < len(m.hh):
        n_households = int(m.hh[persons_cap - 1]) + 1
        types = types[:n_households]
        m = type(m)(*(getattr(m, f)[:persons_cap] for f in ("hh", "rel", "sex", "age", "own_family_name")))
    n = n_households
    birth = birth_days(np.full(len(m.hh), window.extract), m.age)
    head = head_index(m.hh, n)
    head_age = m.age[head]
    mob = P.mobility(head_age)
    # as many arrivals still here as the steady state implies, the mobile young more often
    target = P.ARRIVED_PER_DEPARTED * P.DEPART_RATE * n
    entered = rng.random(n) < np.clip(target * mob / mob.sum(), 0, 0.9)
    # arrivals that are still here lean recent (many of the earlier ones have left again)
    entry = np.maximum(window.extract - trunc_exp(rng, n, P.ARRIVAL_TAU_YEARS * DAYS_PER_YEAR, window.days - 1),
                       add_years(birth[head], 18))
    start = np.where(entered, np.minimum(entry, window.extract), pre_window_start(rng, window, birth[head]))
    jokken = entered & (types == HH["単独"]) & (rng.random(n) < P.JOKKEN_SHARE)
    origin = np.where(entered & ~jokken, rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_IN), NO_MUNI)
    move1, move2, chome, gaiku, go = timeline(rng, window, sampler, n, start, np.full(n, window.extract),
                                               np.clip(P.MOVE_SCALE * mob, 0, 0.9), P.SECOND_MOVE)
    households = Households(
        type=types, start=start, entered=entered, jokken=jokken, origin=origin,
        move1=move1, move2=move2, chome=chome, gaiku=gaiku, go=go,
        exit=np.full(n, NEVER), exit_reason=np.zeros(n, dtype=np.int8), dest=np.full(n, NO_MUNI),
        family=NAMES.family_index(rng, n))
    people = _people(rng, households, m, birth)
    return households, people, head_age


def _people(rng, households: Households, m, birth) -> People:
    own = m.own_family_name
    family = households.family[m.hh].copy()
    family[own] = NAMES.family_index(rng, int(own.sum()))
    return People(hh=m.hh, rel=m.rel, sex=m.sex, birth=birth, family=family,
                  exit=households.exit[m.hh], reason=households.exit_reason[m.hh],
                  dest=households.dest[m.hh])


def departing_households(rng, window: Window, sampler, n: int):
    """Households that left the city as a whole during the window (ages at departure)."""
    pool = max(3 * n, 8)
    types = rng.choice(len(P.DEPARTING_TYPE_SHARES), size=pool, p=P.DEPARTING_TYPE_SHARES)
    m = generate_members(rng, types)
    head = head_index(m.hh, pool)
    weight = P.mobility(m.age[head])
    chosen = np.sort(rng.choice(pool, size=n, replace=False, p=weight / weight.sum()))
    keep = np.isin(m.hh, chosen)
    remap = np.full(pool, -1)
    remap[chosen] = np.arange(n)
    m = type(m)(remap[m.hh[keep]], m.rel[keep], m.sex[keep], m.age[keep], m.own_family_name[keep])
    types = types[chosen]
    # short stays (arrived and left within the window) vs. earlier residents leaving; with stays
    # exp(tau) the yearly 転入 and 転出 totals stay flat across the window
    tau = P.STAY_TAU_YEARS * DAYS_PER_YEAR
    entered = rng.random(n) < P.SHORT_STAY_SHARE
    entry, exit_day = _short_stays(rng, window, int(entered.sum()), tau)
    exit_all = window.start + trunc_exp(rng, n, tau, window.days - 1)
    exit_all[entered] = exit_day
    exit_day = exit_all
    birth = birth_days(exit_day[m.hh], m.age)
    head = head_index(m.hh, n)
    entry_all = np.full(n, NEVER)
    entry_all[entered] = entry
    entered &= entry_all >= add_years(birth[head], 18)
    start = np.where(entered, entry_all, pre_window_start(rng, window, birth[head]))
    origin = np.where(entered, rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_IN), NO_MUNI)
    move1, move2, chome, gaiku, go = timeline(rng, window, sampler, n, start, exit_day - 1,
                                               np.full(n, P.DEPART_MOVED), 0.0)
    households = Households(
        type=types, start=start, entered=entered, jokken=np.zeros(n, dtype=bool), origin=origin,
        move1=move1, move2=move2, chome=chome, gaiku=gaiku, go=go,
        exit=exit_day, exit_reason=np.full(n, REASON_OUT, dtype=np.int8),
        dest=rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_IN),
        family=NAMES.family_index(rng, n))
    return households, _people(rng, households, m, birth)


def _short_stays(rng, window: Window, n: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(arrival, departure) pairs both inside the window, stay ~ exp(tau): arrival uniform,
    kept when the departure falls inside the window (rejection sampling)."""
    entries, exits = [], []
    got = 0
    while got < n:
        k = max(4 * (n - got), 16)
        e = uniform_days(rng, np.full(k, window.start), np.full(k, window.extract - 1))
        x = e + 1 + np.floor(rng.exponential(tau, k)).astype(np.int64)
        ok = x <= window.extract
        entries.append(e[ok])
        exits.append(x[ok])
        got += int(ok.sum())
    return np.concatenate(entries)[:n], np.concatenate(exits)[:n]


def _death_ages(rng, sex: np.ndarray) -> np.ndarray:
    age = np.empty(len(sex))
    for s, weights in P.DEATH_AGES.items():
        mask = sex == s
        p = weights / weights.sum()
        age[mask] = rng.choice(len(p), size=int(mask.sum()), p=p) * 5 + rng.random(int(mask.sum())) * 5
    return age


def deaths(rng, window: Window, sampler, cur: Households, cur_people: People, head_age, n: int):
    """Deaths in the window: late spouses of elderly people now living alone, or people who
    lived alone (their household dissolved). Returns (dissolved households, their people,
    extra people attached to current households)."""
    sex = np.where(rng.random(n) < P.DEATH_MALE_SHARE, 1, 2).astype(np.int8)
    age = _death_ages(rng, sex)
    day = uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    birth = birth_days(day, age)

    # widowed: a current single elderly household registered before the window
    head = head_index(cur_people.hh, len(cur))
    head_sex = cur_people.sex[head]
    candidate = (cur.type == HH["単独"]) & (head_age >= 62) & ~cur.entered
    attach_to = np.full(n, -1)
    wants = (rng.random(n) < P.DEATH_SPOUSE_SHARE) & (age >= 60)
    for s in (1, 2):
        pool = np.flatnonzero(candidate & (head_sex != s))
        rng.shuffle(pool)
        who = np.flatnonzero(wants & (sex == s))
        k = min(len(pool), len(who))
        attach_to[who[:k]] = pool[:k]
    attached = attach_to >= 0
    extra = People(
        hh=attach_to[attached], rel=np.where(sex[attached] == 1, REL["世帯主"], REL["妻"]).astype(np.int8),
        sex=sex[attached], birth=birth[attached], family=cur.family[attach_to[attached]],
        exit=day[attached], reason=np.full(int(attached.sum()), REASON_DEATH, dtype=np.int8),
        dest=np.full(int(attached.sum()), NO_MUNI))

    alone = ~attached
    k = int(alone.sum())
    start = pre_window_start(rng, window, birth[alone])
    move1, move2, chome, gaiku, go = timeline(rng, window, sampler, k, start, day[alone] - 1,
                                               np.full(k, 0.03), 0.0)
    households = Households(
        type=np.full(k, HH["単独"]), start=np.maximum(start, birth[alone]), entered=np.zeros(k, dtype=bool),
        jokken=np.zeros(k, dtype=bool), origin=np.full(k, NO_MUNI), move1=move1, move2=move2,
        chome=chome, gaiku=gaiku, go=go, exit=day[alone],
        exit_reason=np.full(k, REASON_DEATH, dtype=np.int8), dest=np.full(k, NO_MUNI),
        family=NAMES.family_index(rng, k))
    people = People(hh=np.arange(k), rel=np.full(k, REL["世帯主"], dtype=np.int8), sex=sex[alone],
                    birth=birth[alone], family=households.family, exit=day[alone],
                    reason=households.exit_reason, dest=households.dest)
    return households, people, extra


def children_who_left(rng, window: Window, cur: Households, cur_people: People, head_age) -> People:
    """Adult children who left a family household in the city (転出, often to a big city)."""
    head = head_index(cur_people.hh, len(cur))
    eligible = (cur.type == HH["夫婦と子供"]) & (head_age >= 45) & (head_age <= 70) & ~cur.entered
    hh = np.flatnonzero(eligible & (rng.random(len(cur)) < P.CHILD_LEAVES))
    n = len(hh)
    day = uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    age_then = rng.uniform(18.0, 30.0, n)
    birth = birth_days(day, age_then)
    # the head must have been at least 20 at the child's birth
    ok = age_at(cur_people.birth[head[hh]], birth) >= 20
    hh, day, birth = hh[ok], day[ok], birth[ok]
    n = len(hh)
    return People(hh=hh, rel=np.full(n, REL["子"], dtype=np.int8),
                  sex=np.where(rng.random(n) < 0.52, 1, 2).astype(np.int8), birth=birth,
                  family=cur.family[hh], exit=day, reason=np.full(n, REASON_OUT, dtype=np.int8),
                  dest=rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_YOUNG))
