"""The 異動 (resident movements) of one chunk, derived from the household timelines.

Every person's events follow from the household's timeline and their own birth and exit
dates, so residents.csv and movements.csv agree by construction:

* 転入 / 職権記載 in the window  <=> registered_date = idou_date
* 出生 in the window             <=> registered_date = birth_date = idou_date
* 転出 / 死亡                    <=> removed_date = idou_date, removal_reason = idou_type
* the current address is the destination of the person's last 転居 (or the entry address)
"""

from __future__ import annotations

import numpy as np

from sekisho.synth.dates import NEVER
from sekisho.synth.records import IDOU, NO_MUNI, REASON_DEATH, REASON_OUT, Events, Households, People, Window, _concat


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
