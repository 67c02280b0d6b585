"""Residents and their 異動 history, one chunk of households at a time.

A chunk holds a fixed number of *current* households (resident at the extract date) and,
in proportion, the people who left during the window: households that moved away as a
whole (転出), adult children who left home (転出), and the dead (死亡) — either alone in a
household that dissolved, or the late spouse of someone still living in the city.

Each household has an address timeline (up to two 転居 inside the window) and a start date
(転入 in the window, or registration before it). Every person's events follow from the
household's timeline and their own birth and exit dates, so residents.csv and movements.csv
agree by construction:

* 転入 / 職権記載 in the window  <=> registered_date = idou_date
* 出生 in the window             <=> registered_date = birth_date = idou_date
* 転出 / 死亡                    <=> removed_date = idou_date, removal_reason = idou_type
* the current address is the destination of the person's last 転居 (or the entry address)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sekisho.reference import IDOU_TYPES
from sekisho.synth import params as P
from sekisho.synth.dates import DAYS_PER_YEAR, NEVER, add_years, age_at
from sekisho.synth.geography import Geography
from sekisho.synth.households import HH, REL, generate_members
from sekisho.synth.names import NAMES

IDOU = {name: i for i, name in enumerate(IDOU_TYPES)}
REASON_NONE, REASON_OUT, REASON_DEATH = 0, 1, 2
NO_MUNI = -1


@dataclass
class Window:
    start: int    # first day of the window (days since epoch)
    extract: int  # extract date = last day of the window

    @property
    def days(self) -> int:
        return self.extract - self.start + 1


@dataclass
class Households:
    """Per-household arrays of one chunk (positions are chunk-local household indexes)."""

    type: np.ndarray
    start: np.ndarray        # 転入 date if entered in the window, else registration before it
    entered: np.ndarray      # bool: arrived within the window
    jokken: np.ndarray       # bool: the arrival was registered by 職権記載
    origin: np.ndarray       # municipality index of the 転入 origin (NO_MUNI if none)
    move1: np.ndarray        # 転居 dates (NEVER if none)
    move2: np.ndarray
    chome: np.ndarray        # (3, n): address before move1, after move1, after move2
    gaiku: np.ndarray
    go: np.ndarray
    exit: np.ndarray         # whole-household exit date (NEVER if still resident)
    exit_reason: np.ndarray
    dest: np.ndarray         # municipality index of the 転出 destination
    family: np.ndarray       # family-name index

    def __len__(self) -> int:
        return len(self.type)

    def level_at(self, hh: np.ndarray, t: np.ndarray, inclusive: bool) -> np.ndarray:
        """Timeline level (0..2) of households ``hh`` at dates ``t``; moves on day t count if
        ``inclusive`` (arrivals on a move day land at the new address)."""
        if inclusive:
            return (self.move1[hh] <= t).astype(np.int64) + (self.move2[hh] <= t)
        return (self.move1[hh] < t).astype(np.int64) + (self.move2[hh] < t)

    def address(self, hh: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.chome[level, hh], self.gaiku[level, hh], self.go[level, hh]


@dataclass
class People:
    """Per-person arrays of one chunk."""

    hh: np.ndarray
    rel: np.ndarray
    sex: np.ndarray
    birth: np.ndarray
    family: np.ndarray
    exit: np.ndarray          # removal date (NEVER if resident at the extract date)
    reason: np.ndarray        # REASON_*
    dest: np.ndarray          # 転出 destination (NO_MUNI otherwise)
    registered: np.ndarray = None  # filled by finish()

    @property
    def is_current(self) -> np.ndarray:
        return self.exit == NEVER


@dataclass
class Events:
    person: np.ndarray   # chunk-local person index
    type: np.ndarray     # index into IDOU_TYPES
    date: np.ndarray
    muni: np.ndarray     # origin (転入) or destination (転出); NO_MUNI otherwise
    from_chome: np.ndarray  # -1 when not applicable
    from_gaiku: np.ndarray
    to_chome: np.ndarray
    to_gaiku: np.ndarray


def _concat(items, cls):
    fields = cls.__dataclass_fields__
    return cls(**{f: np.concatenate([getattr(i, f) for i in items], axis=-1)
                  for f in fields if getattr(items[0], f) is not None})


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


def _head_index(hh: np.ndarray, n: int) -> np.ndarray:
    """Index of the first member (the head, or in a child-headed household the head child)."""
    return np.searchsorted(hh, np.arange(n))


def _uniform_days(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Uniform integer day in [lo, hi] (requires lo <= hi)."""
    return lo + (rng.random(np.shape(lo)) * (hi - lo + 1)).astype(np.int64)


def _pre_window_start(rng, window: Window, head_birth: np.ndarray) -> np.ndarray:
    """A registration date before the window, after the head turned 18 (at most 45 years back)."""
    adult = add_years(head_birth, 18)
    earliest = np.maximum(adult, window.start - int(45 * DAYS_PER_YEAR))
    earliest = np.minimum(earliest, window.start - 30)
    return _uniform_days(rng, earliest, np.full_like(earliest, window.start - 1))


def _timeline(rng, window, sampler: AddressSampler, n, start, last_day, p_move, p_second):
    """Current address plus up to two 転居. Move dates are uniform over the whole window (so
    the yearly 転居 count is flat) and kept only if after ``start`` and on or before ``last_day``."""
    chome, gaiku, go = sampler.sample(rng, n)
    a = _uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    b = _uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
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


def _trunc_exp(rng, n: int, tau_days: float, upto) -> np.ndarray:
    """Days t in [0, upto] with density proportional to exp(-t / tau)."""
    upto = np.broadcast_to(np.asarray(upto, dtype=np.float64), (n,))
    u = rng.random(n)
    return np.floor(-tau_days * np.log1p(-u * (1 - np.exp(-upto / tau_days)))).astype(np.int64)


def _birth_days(ref: np.ndarray, age_years: np.ndarray) -> np.ndarray:
    """Birth date of someone aged ``age_years`` (fractional) on ``ref``; at least one day old."""
    return ref - np.maximum(1, np.floor(age_years * DAYS_PER_YEAR)).astype(np.int64)


def current_households(rng, window: Window, sampler, n_households: int, persons_cap: int | None):
    """Households resident at the extract date; truncated to ``persons_cap`` persons if given."""
    types = rng.choice(len(P.TYPE_SHARES), size=n_households, p=P.TYPE_SHARES)
    m = generate_members(rng, types)
    if persons_cap is not None and persons_cap < len(m.hh):
        n_households = int(m.hh[persons_cap - 1]) + 1
        types = types[:n_households]
        m = type(m)(*(getattr(m, f)[:persons_cap] for f in ("hh", "rel", "sex", "age", "own_family_name")))
    n = n_households
    birth = _birth_days(np.full(len(m.hh), window.extract), m.age)
    head = _head_index(m.hh, n)
    head_age = m.age[head]
    mob = P.mobility(head_age)
    # as many arrivals still here as the steady state implies, the mobile young more often
    target = P.ARRIVED_PER_DEPARTED * P.DEPART_RATE * n
    entered = rng.random(n) < np.clip(target * mob / mob.sum(), 0, 0.9)
    # arrivals that are still here lean recent (many of the earlier ones have left again)
    entry = np.maximum(window.extract - _trunc_exp(rng, n, P.ARRIVAL_TAU_YEARS * DAYS_PER_YEAR, window.days - 1),
                       add_years(birth[head], 18))
    start = np.where(entered, np.minimum(entry, window.extract), _pre_window_start(rng, window, birth[head]))
    jokken = entered & (types == HH["単独"]) & (rng.random(n) < P.JOKKEN_SHARE)
    origin = np.where(entered & ~jokken, rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_IN), NO_MUNI)
    move1, move2, chome, gaiku, go = _timeline(rng, window, sampler, n, start, np.full(n, window.extract),
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
    head = _head_index(m.hh, pool)
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
    exit_all = window.start + _trunc_exp(rng, n, tau, window.days - 1)
    exit_all[entered] = exit_day
    exit_day = exit_all
    birth = _birth_days(exit_day[m.hh], m.age)
    head = _head_index(m.hh, n)
    entry_all = np.full(n, NEVER)
    entry_all[entered] = entry
    entered &= entry_all >= add_years(birth[head], 18)
    start = np.where(entered, entry_all, _pre_window_start(rng, window, birth[head]))
    origin = np.where(entered, rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_IN), NO_MUNI)
    move1, move2, chome, gaiku, go = _timeline(rng, window, sampler, n, start, exit_day - 1,
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
        e = _uniform_days(rng, np.full(k, window.start), np.full(k, window.extract - 1))
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
    day = _uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    birth = _birth_days(day, age)

    # widowed: a current single elderly household registered before the window
    head = _head_index(cur_people.hh, len(cur))
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
    start = _pre_window_start(rng, window, birth[alone])
    move1, move2, chome, gaiku, go = _timeline(rng, window, sampler, k, start, day[alone] - 1,
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
    head = _head_index(cur_people.hh, len(cur))
    eligible = (cur.type == HH["夫婦と子供"]) & (head_age >= 45) & (head_age <= 70) & ~cur.entered
    hh = np.flatnonzero(eligible & (rng.random(len(cur)) < P.CHILD_LEAVES))
    n = len(hh)
    day = _uniform_days(rng, np.full(n, window.start), np.full(n, window.extract))
    age_then = rng.uniform(18.0, 30.0, n)
    birth = _birth_days(day, age_then)
    # the head must have been at least 20 at the child's birth
    ok = age_at(cur_people.birth[head[hh]], birth) >= 20
    hh, day, birth = hh[ok], day[ok], birth[ok]
    n = len(hh)
    return People(hh=hh, rel=np.full(n, REL["子"], dtype=np.int8),
                  sex=np.where(rng.random(n) < 0.52, 1, 2).astype(np.int8), birth=birth,
                  family=cur.family[hh], exit=day, reason=np.full(n, REASON_OUT, dtype=np.int8),
                  dest=rng.choice(len(P.MUNI_CODES), size=n, p=P.MUNI_WEIGHTS_YOUNG))


def registered_dates(households: Households, people: People) -> np.ndarray:
    return np.maximum(people.birth, households.start[people.hh])


def derive_events(window: Window, households: Households, people: People) -> Events:
    """All 異動 of ``people`` in the window, from the household timelines."""
    idx = np.arange(len(people.hh))
    hh = people.hh
    reg = people.registered
    parts: list[Events] = []

    def add(mask, kind, date, muni, frm, to):
        """Events for the people in ``mask``; kind/muni per person or scalar, frm/to address
        pairs (chome, gaiku) per person or None."""
        sel = np.flatnonzero(mask)
        k = len(sel)
        none = np.full(k, -1)
        fc, fg = (frm[0][sel], frm[1][sel]) if frm is not None else (none, none)
        tc, tg = (to[0][sel], to[1][sel]) if to is not None else (none, none)
        kind = np.broadcast_to(np.asarray(kind, dtype=np.int8), (len(mask),))
        muni = np.broadcast_to(np.asarray(NO_MUNI if muni is None else muni), (len(mask),))
        parts.append(Events(person=idx[sel], type=kind[sel].copy(), date=date[sel], muni=muni[sel].copy(),
                            from_chome=fc, from_gaiku=fg, to_chome=tc, to_gaiku=tg))

    # arrivals: birth here, or 転入 / 職権記載 with the household
    in_window = reg >= window.start
    born_here = in_window & (people.birth >= households.start[hh])
    arrived = in_window & ~born_here
    entry_addr = households.address(hh, households.level_at(hh, reg, inclusive=True))[:2]
    add(born_here, IDOU["出生"], reg, None, None, entry_addr)
    kind = np.where(households.jokken[hh], IDOU["職権記載"], IDOU["転入"]).astype(np.int8)
    add(arrived, kind, reg, households.origin[hh], None, entry_addr)

    # 転居 of the household while the person lived there
    for level, move in ((1, households.move1), (2, households.move2)):
        d = move[hh]
        mask = (d != NEVER) & (reg < d) & (d < people.exit)
        frm = households.address(hh, np.full(len(hh), level - 1))[:2]
        to = households.address(hh, np.full(len(hh), level))[:2]
        add(mask, IDOU["転居"], d, None, frm, to)

    # exits
    exit_addr = households.address(hh, households.level_at(hh, people.exit, inclusive=False))[:2]
    add(people.reason == REASON_OUT, IDOU["転出"], people.exit, people.dest, exit_addr, None)
    add(people.reason == REASON_DEATH, IDOU["死亡"], people.exit, None, exit_addr, None)
    events = _concat(parts, Events)
    order = np.lexsort((events.type, events.person, events.date))
    return Events(**{f: getattr(events, f)[order] for f in Events.__dataclass_fields__})


def current_address(households: Households, people: People):
    """Address at the extract date for residents, at removal for 除票."""
    t = np.where(people.exit == NEVER, NEVER - 1, people.exit)
    return households.address(people.hh, households.level_at(people.hh, t, inclusive=False))
