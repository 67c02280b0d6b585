"""SQL fragments shared by the report notebooks (definitions in one place, see docs/reports.md).

All of them are row-level filters on dimension columns, which the guard accepts below its
aggregation boundary. Months are ``YYYY-MM`` strings, so ranges compare lexically.
"""

from __future__ import annotations

from sekisho.reports.periods import check_month

#: report area level (parameter ``area_level``) -> column of the residents/movements views
AREA_COLUMNS = {"地域ブロック": "block", "町丁目": "chome_name", "mesh": "mesh1km"}
AREA_LABELS = {"block": "地域ブロック", "chome_name": "町丁目", "mesh1km": "1kmメッシュ"}

def lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def resident_at(month: str) -> str:
    """Resident at the end of ``month``: registered by then and not removed by then."""
    m = lit(check_month(month, "基準年月"))
    return f"(registered_ym <= {m} AND (removed_ym IS NULL OR removed_ym > {m}))"


def moved_between(first: str, last: str, column: str = "idou_ym") -> str:
    return f"({column} BETWEEN {lit(check_month(first))} AND {lit(check_month(last))})"


def in_childcare_at(month: str) -> str:
    """A placed child using a facility at some time during ``month``."""
    m = lit(check_month(month, "基準年月"))
    return (f"(facility_id IS NOT NULL AND use_from_ym <= {m} "
            f"AND (use_to_ym IS NULL OR use_to_ym >= {m}))")


def age_at_month_end(month: str, birth_ym: str = "birth_ym") -> str:
    """Completed years at the end of ``month`` from a ``YYYY-MM`` birth month (exact: by the
    end of a month everyone born in it has had their birthday)."""
    y, m = (int(x) for x in check_month(month, "基準年月").split("-"))
    born = (f"(CAST(SUBSTRING({birth_ym}, 1, 4) AS INTEGER) * 12 "
            f"+ CAST(SUBSTRING({birth_ym}, 6, 2) AS INTEGER))")
    return f"(({y * 12 + m} - {born}) // 12)"


def age_band_at(month: str, birth_ym: str = "birth_ym") -> str:
    """e-Stat band of the age at the end of ``month`` (a row-level CASE the guard accepts)."""
    from sekisho.reference import age_band_sql

    return age_band_sql(age_at_month_end(month, birth_ym))
