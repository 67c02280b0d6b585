"""The derivations a view column may name (``derive:``), one small SQL unit each.

The policy loader (``sekisho.policy.DERIVATIONS``) has already resolved every operand and
checked its type, so a unit here only writes SQL: it receives the derivation's
parameters and ``sql`` (``sekisho.ingest.views.Renderer``), which renders an operand (a
released value, an exact raw value kept inside the ingest, a key, a day of the year, or a
nested derivation) as an expression over the view's staging tables, and knows the
upload's extract month and the totals joined for lookups. A test keeps this registry
equal to the policy's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sekisho.ingest.rules import band as band_sql
from sekisho.ingest.rules import ident, lit, topcoded_age
from sekisho.policy import BAND_OUTSIDE

Render = Callable[[Any], str]


def first_of(params: dict, sql: Render) -> str:
    """The first operand that is not empty."""
    return f"coalesce({', '.join(sql(op) for op in params['of'])})"


def is_empty(params: dict, sql: Render) -> str:
    """True where the operand is empty (NULL)."""
    return f"({sql(params['of'])} IS NULL)"


def year(params: dict, sql: Render) -> str:
    """The year of a YYYY-MM month (the loader checked the format; the ingest enforces it)."""
    return f"CAST(substr({sql(params['of'])}, 1, 4) AS BIGINT)"


def month(params: dict, sql: Render) -> str:
    """The month (1-12) of a YYYY-MM month."""
    return f"CAST(substr({sql(params['of'])}, 6, 2) AS BIGINT)"


def fiscal_year(params: dict, sql: Render) -> str:
    """The year in which the fiscal year containing a YYYY-MM month began (年度 when the
    first month is 4: 2026-03 belongs to 2025年度)."""
    ym, first = sql(params["of"]), int(params["first_month"])
    return (f"(CAST(substr({ym}, 1, 4) AS BIGINT) - "
            f"CASE WHEN CAST(substr({ym}, 6, 2) AS BIGINT) < {first} THEN 1 ELSE 0 END)")


def band(params: dict, sql: Render) -> str:
    """Fixed-width bands ``lo-hi`` of a non-negative integer, the last one open (``top+``)."""
    return band_sql(sql(params["of"]), params["width"], params["top"])


def age(params: dict, sql: Render) -> str:
    """Completed years from the exact birth date to the exact date ``at``, top-coded at
    the birth date's rule's ``top_age`` (resolved by the loader into ``top``)."""
    return topcoded_age(sql(params["born"]), sql(params["at"]), params["top"])


def case(params: dict, sql: Render) -> str:
    """``then`` where the tested operand is one of the listed values, else ``else``."""
    tested, values = params["when"]
    listed = ", ".join(_literal(v) for v in values)
    otherwise = f" ELSE {sql(params['else'])}" if params["else"] is not None else ""
    return f"CASE WHEN {sql(tested)} IN ({listed}) THEN {sql(params['then'])}{otherwise} END"


def extract_month(params: dict, sql: Render) -> str:
    """The upload's extract month, YYYY-MM (the snapshot's 基準年月)."""
    return lit(sql.extract_month)


def total(params: dict, sql: Render) -> str:
    """The total looked up on the row's keys: a column of its joined table (NULL where no
    record of the total's source holds these keys)."""
    keys = tuple((name, sql(op)) for name, op in params["at"])
    return f"{sql.total_join(params['total'], keys)}.{ident('total')}"


def bands(params: dict, sql: Render) -> str:
    """The label of the class holding the value (from <= value < below), the scheme's
    ``missing`` label (or NULL) for no value, and BAND_OUTSIDE below the first class
    (outside every domain: the upload is refused)."""
    value, scheme = sql(params["of"]), params["bands"]
    missing = lit(scheme.missing) if scheme.missing else "NULL"
    whens = [f"WHEN {value} IS NULL THEN {missing}"]
    for cls in scheme.classes:
        test = f"{value} >= {_literal(cls.lo)}" + (f" AND {value} < {_literal(cls.hi)}" if cls.hi is not None else "")
        whens.append(f"WHEN {test} THEN {lit(cls.label)}")
    return f"CASE {' '.join(whens)} ELSE {lit(BAND_OUTSIDE)} END"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value) if isinstance(value, (int, float)) else lit(value)


DERIVATIONS: dict[str, Callable[[dict, Render], str]] = {
    "first_of": first_of,
    "is_empty": is_empty,
    "year": year,
    "month": month,
    "fiscal_year": fiscal_year,
    "band": band,
    "age": age,
    "case": case,
    "extract_month": extract_month,
    "total": total,
    "bands": bands,
}
