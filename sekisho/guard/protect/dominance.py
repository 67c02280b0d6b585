"""Dominance rules for magnitude cells (ACRO / ONS practice).

* NK rule (n, k): a cell fails when its ``n`` largest contributors hold more than ``k``
  of the total (n=2, k=0.9: two persons hold over 90 %).
* p% rule: a cell fails when the total minus the two largest contributions is below
  ``p`` x the largest — the second-largest contributor could then estimate the largest
  within p %.

Contributions are per person (all of a person's rows in the cell summed), in absolute
value, so record replication (one person's many rows) cannot dilute a dominant person.
"""

from __future__ import annotations

import numpy as np


def nk_fails(total_abs, top1, top2, *, n: int = 2, k: float = 0.9) -> np.ndarray:
    total_abs = np.asarray(total_abs, dtype=float)
    top = np.abs(np.asarray(top1, dtype=float)) + (np.abs(np.asarray(top2, dtype=float)) if n >= 2 else 0.0)
    return np.where(total_abs > 0, top > k * total_abs, False)


def p_percent_fails(total_abs, top1, top2, *, p: float = 0.10) -> np.ndarray:
    total_abs = np.asarray(total_abs, dtype=float)
    t1 = np.abs(np.asarray(top1, dtype=float))
    t2 = np.abs(np.asarray(top2, dtype=float))
    remainder = total_abs - t1 - t2
    return np.where(t1 > 0, remainder < p * t1, False)


def dominated(total_abs, top1, top2, *, nk_n: int, nk_k: float, p_percent: float) -> np.ndarray:
    return nk_fails(total_abs, top1, top2, n=nk_n, k=nk_k) | p_percent_fails(total_abs, top1, top2, p=p_percent)
