"""SQL fragments shared by the report notebooks (definitions in one place, see docs/reports.md).

All of them are row-level filters on dimension columns, which the guard accepts below its
aggregation boundary. Months are ``YYYY-MM`` strings, so ranges compare lexically.
"""

from __future__ import annotations

from sekisho.reports.periods import check_month

#: report area level (parameter ``area_level``) -> column of the residents/movements views
AREA_COLUMNS = {"地域ブロック": "block", "町丁目": "chome_name", "mesh": "mesh1km"}
AREA_LABELS = {"block": "地域ブロック", "chome_name": "町丁目", "mesh1km": "1kmメッシュ"}

#: 続柄 -> generation relative to the household head (国勢調査 family-type derivation)
GENERATIONS = {
    "祖父": 2, "祖母": 2, "父": 1, "母": 1, "世帯主": 0, "妻": 0, "夫": 0, "兄弟姉妹": 0,
    "子": -1, "子の配偶者": -1, "孫": -2,
}


def lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def resident_at(month: str) -> str:
    """Resident at the end of ``month``: registered by then and not removed by then."""
    m = lit(check_month(month, "基準年月"))
    return f"(registered_ym <= {m} AND (removed_ym IS NULL OR removed_ym > {m}))"


def moved_between(first: str, last: str) -> str:
    return f"(idou_ym BETWEEN {lit(check_month(first))} AND {lit(check_month(last))})"


def in_childcare_at(month: str) -> str:
    """A placed child using a facility at some time during ``month``."""
    m = lit(check_month(month, "基準年月"))
    return (f"(facility_id IS NOT NULL AND use_from_ym <= {m} "
            f"AND (use_to_ym IS NULL OR use_to_ym >= {m}))")


def household_type_sql(month: str) -> str:
    """Households present at ``month`` by 国勢調査 family type, derived from the 続柄 of the
    members present then (per-household features grouped by household_id, then counted)."""
    def present(rels: tuple[str, ...]) -> str:
        return f"MAX(CASE WHEN relationship IN ({', '.join(lit(r) for r in rels)}) THEN 1 ELSE 0 END)"

    def count(rels: tuple[str, ...]) -> str:
        return f"SUM(CASE WHEN relationship IN ({', '.join(lit(r) for r in rels)}) THEN 1 ELSE 0 END)"

    gens = " + ".join(present(tuple(r for r, g in GENERATIONS.items() if g == level))
                      for level in (2, 1, 0, -1, -2))
    nuclear = ("世帯主", "妻", "夫", "子")
    return f"""
SELECT household_type, COUNT(*) AS households FROM (
  SELECT household_id,
    CASE
      WHEN COUNT(*) = 1 THEN '単独'
      WHEN {gens} >= 3 THEN '三世代'
      WHEN COUNT(*) > {count(nuclear)} OR {count(('世帯主',))} <> 1 THEN 'その他'
      WHEN {count(('妻', '夫'))} = 1 AND {count(('子',))} = 0 THEN '夫婦のみ'
      WHEN {count(('妻', '夫'))} = 1 THEN '夫婦と子供'
      WHEN {count(('妻', '夫'))} = 0 THEN 'ひとり親と子供'
      ELSE 'その他'
    END AS household_type
  FROM residents
  WHERE {resident_at(month)}
  GROUP BY household_id
) AS h
GROUP BY household_type"""
