"""SQL fragments shared by the report notebooks (definitions in one place, see docs/reports.md).

All of them are row-level filters on dimension columns, which the guard accepts below its
aggregation boundary. Months are ``YYYY-MM`` strings, so ranges compare lexically.
"""

from __future__ import annotations

from sekisho.reference import HOUSEHOLD_TYPES
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


#: 国勢調査 世帯の家族類型, in the census order (the code list the generator uses too)
FAMILY_TYPES = tuple(HOUSEHOLD_TYPES)


def _members(*relationships: str) -> str:
    """Members of the household with one of ``relationships`` (a unit feature)."""
    return f"COUNT_IF(relationship IN ({', '.join(lit(r) for r in relationships)}))"


def family_type_sql() -> str:
    """家族類型 of a household from the 続柄 of its members (inside ``GROUP BY household_id``).

    Mirrors how ``sekisho.synth`` builds households: 単独 one member; 三世代 a parent of the
    head (父/母) together with a child (子), or a grandchild (孫) together with a child or a
    child's spouse; 夫婦のみ head + spouse; 夫婦と子供 head + spouse + children only;
    ひとり親と子供 head + children only, or (an elderly parent living with their adult
    child who heads the household) head + one parent + the head's siblings only;
    その他 everything else (siblings, grandparents, non-relatives, couple with a parent)."""
    n, head, spouse = "COUNT(*)", _members("世帯主"), _members("妻", "夫")
    child, parent, grandchild = _members("子"), _members("父", "母"), _members("孫")
    in_law, sibling = _members("子の配偶者"), _members("兄弟姉妹")
    return (f"CASE WHEN {n} = 1 THEN '単独' "
            f"WHEN ({parent} > 0 AND {child} > 0) OR ({grandchild} > 0 AND {child} + {in_law} > 0) THEN '三世代' "
            f"WHEN {head} = 1 AND {spouse} = 1 AND {n} = 2 THEN '夫婦のみ' "
            f"WHEN {head} = 1 AND {spouse} = 1 AND {child} > 0 AND {n} = 2 + {child} THEN '夫婦と子供' "
            f"WHEN {head} = 1 AND {spouse} = 0 AND {child} > 0 AND {n} = 1 + {child} THEN 'ひとり親と子供' "
            f"WHEN {head} = 1 AND {spouse} = 0 AND {child} = 0 AND {parent} = 1 AND {n} = 2 + {sibling} "
            f"THEN 'ひとり親と子供' "
            f"ELSE 'その他' END")


def households_at(month: str) -> str:
    """One row per household resident at the end of ``month`` (a guard *unit scope*): its
    地域ブロック (MIN over members: a household lives at one address), member count and
    家族類型. Use it as a derived table and count its rows with COUNT(*)."""
    return (f"(SELECT household_id, MIN(block) AS block, COUNT(*) AS members, "
            f"{family_type_sql()} AS family_type "
            f"FROM residents WHERE {resident_at(month)} GROUP BY household_id)")
