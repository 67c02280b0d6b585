"""The arrays of one chunk of the synthetic city: households (type, arrival, address
timeline, exit), people, and their 異動 events, with the codes they use.

Column arrays rather than objects, because a chunk holds thousands of households and
every step (sampling, deriving events, writing CSV) is vectorised over them. Shared by
the samplers (``sekisho.synth.population``), the event derivation
(``sekisho.synth.events``) and the writer (``sekisho.synth.generator``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sekisho.reference import IDOU_TYPES
from sekisho.synth.dates import NEVER

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
