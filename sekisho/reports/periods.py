"""Month arithmetic on ``YYYY-MM`` strings (the store's month columns are such strings,
so range filters compare them lexically)."""

from __future__ import annotations

import re

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def check_month(value: str, name: str = "month") -> str:
    if not isinstance(value, str) or not _MONTH.match(value):
        raise ValueError(f"{name} must be YYYY-MM (年月), got {value!r}")
    return value


def add_months(month: str, delta: int) -> str:
    m = _MONTH.match(check_month(month))
    index = int(m.group(1)) * 12 + int(m.group(2)) - 1 + delta
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def months_between(first: str, last: str) -> list[str]:
    """Every month from ``first`` to ``last`` inclusive."""
    out, m = [], check_month(first)
    while m <= check_month(last):
        out.append(m)
        m = add_months(m, 1)
    return out


def year_windows(base_month: str, years: int) -> list[tuple[str, str, str]]:
    """``years`` consecutive 12-month windows ending at ``base_month``, oldest first:
    (first month, last month, label such as ``2025-11〜2026-10``)."""
    windows = []
    for i in reversed(range(years)):
        last = add_months(base_month, -12 * i)
        first = add_months(last, -11)
        windows.append((first, last, f"{first}〜{last}"))
    return windows


def label_ja(month: str) -> str:
    """``2026-10`` -> ``2026年10月``."""
    y, m = check_month(month).split("-")
    return f"{y}年{int(m)}月"
