"""Vectorised calendar helpers on dates stored as int64 days since 1970-01-01 (pyarrow date32)."""

from __future__ import annotations

import datetime as dt

import numpy as np

EPOCH = dt.date(1970, 1, 1)
NEVER = np.iinfo(np.int64).max // 4  # "no such date" sentinel that still compares and adds safely
DAYS_PER_YEAR = 365.2425


def to_days(day: dt.date) -> int:
    return (day - EPOCH).days


def from_days(days: int) -> dt.date:
    return EPOCH + dt.timedelta(days=int(days))


def ymd(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(year, month 1-12, day 1-31) of each date."""
    d = np.asarray(days, dtype=np.int64).astype("datetime64[D]")
    months = d.astype("datetime64[M]")
    years = d.astype("datetime64[Y]")
    year = years.astype(np.int64) + 1970
    month = (months - years.astype("datetime64[M]")).astype(np.int64) + 1
    day = (d - months.astype("datetime64[D]")).astype(np.int64) + 1
    return year, month, day


def from_ymd(year, month, day) -> np.ndarray:
    """Days for (year, month, day); a day past the month's end rolls into the next month."""
    year = np.asarray(year, dtype=np.int64)
    month = np.asarray(month, dtype=np.int64)
    months = (year - 1970) * 12 + (month - 1)
    return months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) + np.asarray(day) - 1


def add_years(days: np.ndarray, years) -> np.ndarray:
    """The same calendar day ``years`` later (29 February rolls to 1 March)."""
    y, m, d = ymd(days)
    return from_ymd(y + np.asarray(years, dtype=np.int64), m, d)


def age_at(birth: np.ndarray, ref) -> np.ndarray:
    """Completed years of age on ``ref`` (scalar or array of days)."""
    by, bm, bd = ymd(birth)
    ry, rm, rd = ymd(np.broadcast_to(np.asarray(ref, dtype=np.int64), np.shape(birth)))
    return ry - by - ((rm * 100 + rd) < (bm * 100 + bd))


def month_start_on_or_after(days: np.ndarray) -> np.ndarray:
    y, m, d = ymd(days)
    return np.where(d == 1, days, from_ymd(y, m + 1, 1))
