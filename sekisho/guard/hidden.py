"""The guard's hidden column names, defined once.

The rewrite, the cells SQL, the protection modules and condition influence pass tables
to each other whose columns carry these names. None of them is in an analyst-visible
schema (the analysis refuses identifiers starting with ``__``), so no query can name
or shadow them.

Row SELECT of a boundary (``rewrite``):
  ``__g<j>`` group key j, ``__a<j>`` argument of aggregate j, ``__pid`` privacy unit
  (or a unit's linkage key), ``__rkey`` record key (or a unit's key).
Cells (``cells``; one row per group, never leave the service):
  ``__n`` contributors, ``__ck`` cell key, ``__x<j>`` count-like aggregate j,
  ``__s<j>``/``__c<j>`` sum and non-null count, ``__t<j>``/``__ta<j>`` the two largest and
  the total absolute per-person contributions (dominance), ``__xn<j>``/``__xk<j>`` and
  ``__sn<j>``/``__sk<j>`` a conditional aggregate's own contributors and their cell key.
Protected table of boundary i (post-processing input): ``__b<i>`` with columns
  ``__g<j>`` and ``__v<j>`` (the protected value of aggregate j).
"""

from __future__ import annotations

PID = "__pid"
RKEY = "__rkey"
CONTRIBUTORS = "__n"
CELL_KEY = "__ck"
GROUP_KEY_PREFIX = "__g"
# (not a column) in a release's cell record: its rows are one per contributor, so the
# sum of its cells is a margin an analyst can add up (``cell_pairs.margins``)
ONE_ROW_EACH = "__one_row"


def group_key(j: int) -> str:
    return f"{GROUP_KEY_PREFIX}{j}"


def argument(j: int) -> str:
    return f"__a{j}"


def protected_value(j: int) -> str:
    return f"__v{j}"


def boundary_table(i: int) -> str:
    return f"__b{i}"


def count(j: int) -> str:
    return f"__x{j}"


def total(j: int) -> str:
    return f"__s{j}"


def nonnull(j: int) -> str:
    return f"__c{j}"


def largest(j: int) -> str:
    return f"__t{j}"


def absolute_total(j: int) -> str:
    return f"__ta{j}"


def own_contributors(j: int, kind: str) -> tuple[str, str]:
    """(contributors, cell key) of conditional aggregate j: ``kind`` "count" or "sum"."""
    prefix = "__x" if kind == "count" else "__s"
    return f"{prefix}n{j}", f"{prefix}k{j}"
