"""SQL that turns a boundary's row-level SELECT into cells with their hidden
protection columns. Runs on the store; its result never leaves the service.

Columns of a cell (one row per group):

* ``__g0..``  group keys
* ``__n``     distinct persons in the cell (the contributor count for k and partition selection)
* ``__ck``    cell key: sum of record keys mod 256
* ``__x<j>``  count-like aggregate j (rows, non-null rows, distinct persons/households);
  absent where it is ``__n`` itself (COUNT(*) or COUNT(DISTINCT person) in a view with
  one row per person): see ``threshold.counted``
* ``__s<j>``, ``__c<j>``  sum and non-null count of aggregate j (SUM/AVG)
* ``__t<j>``  the two largest absolute per-person contributions (list) and ``__ta<j>`` the
  total of absolute per-person contributions — for the dominance rules
* ``__xn<j>``, ``__xk<j>`` (conditional counts) and ``__sn<j>``, ``__sk<j>`` (conditional
  sums and means): the aggregate's *own* contributors — the persons its condition selects
  — and their cell key, so that ``COUNT(CASE WHEN c THEN 1 END)`` is protected exactly
  like the cell ``WHERE c`` (k applies to them, the noise is theirs)

In DP mode the rows are first bounded per person: at most ``max_groups`` groups (chosen
by a salted hash of the group keys) and ``max_rows`` rows (chosen at random) per person;
sums are clamped to the policy bounds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sekisho.guard.protect.cellkey import cell_key_sql
from sekisho.guard.protect.threshold import CONTRIBUTOR_COUNTS
from sekisho.guard.rewrite import PID, RKEY, BoundaryPlan


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Bounding:
    max_groups: int
    max_rows: int
    clamp: dict[int, tuple[float, float]]   # aggregate index -> (lo, hi)


def conditional(agg) -> bool:
    """An aggregate whose own contributors may be fewer than the cell's: a count of a
    condition, or a sum/mean under a condition (its argument is not a bare column)."""
    return agg.kind == "count_nonnull" or (agg.kind in ("sum", "avg") and agg.arg is not None
                                           and agg.arg.key != "column")


def _own_key(j: int) -> str:
    """Cell key of the rows where aggregate ``j``'s argument is not NULL (one row per person)."""
    counted = q(f"__a{j}")
    return cell_key_sql(f"COALESCE(SUM({RKEY}) FILTER (WHERE {counted} IS NOT NULL), 0)")


def twin_pairs(bp: BoundaryPlan) -> list[tuple[int, int]]:
    """Pairs of the boundary's aggregates that consistent noise answers alike when they
    have the same contributors (counts with counts, sums and means of one measure with
    each other) and whose contributors may differ (not both every person of the cell, not
    the same argument): within a cell their contributors must not differ by 1..k-1
    (``cell_influence.twins``). Decided from the query text."""
    def family(agg) -> str | None:
        if agg.kind in CONTRIBUTOR_COUNTS or agg.kind == "count_nonnull":
            return "count"
        if agg.kind in ("sum", "avg"):
            return "sum:" + (getattr(agg, "measure", None) or "")
        return None

    out = []
    aggs = bp.aggregates
    for j1 in range(len(aggs)):
        for j2 in range(j1 + 1, len(aggs)):
            a, b = aggs[j1], aggs[j2]
            if family(a) is None or family(a) != family(b):
                continue
            if a.kind in CONTRIBUTOR_COUNTS and b.kind in CONTRIBUTOR_COUNTS:
                continue   # both: every person of the cell
            if a.kind not in CONTRIBUTOR_COUNTS and b.kind not in CONTRIBUTOR_COUNTS and a.arg == b.arg:
                continue   # the same argument: the same contributors
            out.append((j1, j2))
    return out


def _member(bp: BoundaryPlan, j: int, *, per_person: bool) -> str:
    """Whether a row (``per_person``: a person's row of ``__pp``) contributes to aggregate j."""
    kind = bp.aggregates[j].kind
    if kind in CONTRIBUTOR_COUNTS:
        return "TRUE"
    if not per_person:
        return f"({q(f'__a{j}')} IS NOT NULL)"
    return f"(__p{j} > 0)" if kind == "count_nonnull" else f"(__pc{j} > 0)"


def _twin_columns(bp: BoundaryPlan, pairs, *, per_person: bool, key: str) -> list[str]:
    out = []
    for j1, j2 in pairs:
        differs = f"{_member(bp, j1, per_person=per_person)} <> {_member(bp, j2, per_person=per_person)}"
        out.append(f"COUNT(*) FILTER (WHERE {differs}) AS __tw{j1}_{j2}")
        out.append(f"{cell_key_sql(f'COALESCE(SUM({key}) FILTER (WHERE {differs}), 0)')} AS __twk{j1}_{j2}")
    return out


def _num(value: float) -> str:
    return repr(float(value))


def cells_sql(bp: BoundaryPlan, *, person_unique: bool, bounding: Bounding | None = None,
              dominance: bool = True, twins: bool = False, cell_keys: bool = True) -> str:
    """``twins`` (threshold mode): per pair of ``twin_pairs`` the persons in exactly one of
    the two (``__tw<j1>_<j2>``) and their cell key (``__twk<j1>_<j2>``). ``cell_keys``
    False (DP mode: the noise is drawn afresh, not from the records' keys): no cell
    keys, so the record keys are not read."""
    pairs = twin_pairs(bp) if twins else []
    keys = [q(f"__g{j}") for j in range(len(bp.group_keys))]
    key_list = ", ".join(keys)
    ctes = [f"__rows AS ({bp.row_sql})"]
    source = "__rows"
    if bounding is not None and not person_unique:
        salt = secrets.randbelow(2 ** 31)
        order = f"hash({key_list}, {salt})" if keys else "1"
        ctes.append(f"__ranked AS (SELECT *, dense_rank() OVER (PARTITION BY {PID} ORDER BY {order}) AS __grank "
                    f"FROM __rows)")
        ctes.append(f"__kept AS (SELECT *, row_number() OVER (PARTITION BY {PID} ORDER BY random()) AS __rrank "
                    f"FROM __ranked WHERE __grank <= {int(bounding.max_groups)})")
        ctes.append(f"__bounded AS (SELECT * FROM __kept WHERE __rrank <= {int(bounding.max_rows)})")
        source = "__bounded"

    def arg(j: int) -> str:
        col = q(f"__a{j}")
        if bounding is not None and j in bounding.clamp:
            lo, hi = bounding.clamp[j]
            return f"LEAST(GREATEST(CAST({col} AS DOUBLE), {_num(lo)}), {_num(hi)})"
        return col

    group_by = f" GROUP BY {key_list}" if keys else ""
    distinct_joins: list[tuple[str, str]] = []

    if person_unique:
        # one row per person: per-person contributions are the rows themselves
        # the privacy unit is never NULL in a person-level view, so rows = persons and the
        # (wide) identifier column need not be read at all
        select = [*keys, "COUNT(*) AS __n"] + ([f"{cell_key_sql(f'SUM({RKEY})')} AS __ck"] if cell_keys else [])
        for j, agg in enumerate(bp.aggregates):
            if agg.kind in CONTRIBUTOR_COUNTS:
                continue   # rows = persons = __n: not fetched and converted twice
            elif agg.kind == "count_nonnull":
                select.append(f"COUNT({q(f'__a{j}')}) AS __x{j}")
                if cell_keys:
                    select.append(f"{_own_key(j)} AS __xk{j}")
            elif agg.kind == "count_households":
                select.append(f"COUNT(DISTINCT {q(f'__a{j}')}) AS __x{j}")
            else:
                select.append(f"SUM({arg(j)}) AS __s{j}")
                select.append(f"COUNT({q(f'__a{j}')}) AS __c{j}")
                if conditional(agg):
                    select.append(f"COUNT({q(f'__a{j}')}) AS __sn{j}")
                    if cell_keys:
                        select.append(f"{_own_key(j)} AS __sk{j}")
                if dominance:
                    select.append(f"max(abs({arg(j)}), 2) AS __t{j}")
                    select.append(f"SUM(abs({arg(j)})) AS __ta{j}")
        select += _twin_columns(bp, pairs, per_person=False, key=RKEY)
        body = f"SELECT {', '.join(select)} FROM {source}{group_by}"
        return f"WITH {', '.join(ctes)} {body}"

    # general case: aggregate per (cell, person) first, then per cell
    # a person's records are counted once in the cell key (SUM(DISTINCT)), so a join that
    # repeats rows (fan-out) does not change the noise of the same contributing records
    per_person = [*keys, PID, "COUNT(*) AS __r"] + ([f"SUM(DISTINCT {RKEY}) AS __k"] if cell_keys else [])
    outer = [*keys, "COUNT(*) AS __n"] + ([f"{cell_key_sql('SUM(__k)')} AS __ck"] if cell_keys else [])
    for j, agg in enumerate(bp.aggregates):
        if agg.kind == "count_rows":
            outer.append(f"SUM(__r) AS __x{j}")
        elif agg.kind == "count_nonnull":
            per_person.append(f"COUNT({q(f'__a{j}')}) AS __p{j}")
            outer.append(f"SUM(__p{j}) AS __x{j}")
            outer.append(f"COUNT(*) FILTER (WHERE __p{j} > 0) AS __xn{j}")
            if cell_keys:
                outer.append(f"{cell_key_sql(f'COALESCE(SUM(__k) FILTER (WHERE __p{j} > 0), 0)')} AS __xk{j}")
        elif agg.kind == "count_persons":
            outer.append(f"COUNT(*) AS __x{j}")
        elif agg.kind == "count_households":
            counted = f"COUNT(DISTINCT {q(f'__a{j}')}) AS __x{j}"
            distinct_joins.append((f"__d{j}", f"SELECT {', '.join([*keys, counted])} FROM {source}{group_by}"))
        else:
            per_person.append(f"SUM({arg(j)}) AS __p{j}")
            per_person.append(f"COUNT({q(f'__a{j}')}) AS __pc{j}")
            outer.append(f"SUM(__p{j}) AS __s{j}")
            outer.append(f"SUM(__pc{j}) AS __c{j}")
            if conditional(agg):
                outer.append(f"COUNT(*) FILTER (WHERE __pc{j} > 0) AS __sn{j}")
                if cell_keys:
                    outer.append(f"{cell_key_sql(f'COALESCE(SUM(__k) FILTER (WHERE __pc{j} > 0), 0)')} AS __sk{j}")
            if dominance:
                outer.append(f"max(abs(__p{j}), 2) AS __t{j}")
                outer.append(f"SUM(abs(__p{j})) AS __ta{j}")
    for j1, j2 in pairs:   # what __pp needs to tell a person's membership of each
        for j in (j1, j2):
            kind = bp.aggregates[j].kind
            if kind == "count_nonnull" and f"COUNT({q(f'__a{j}')}) AS __p{j}" not in per_person:
                per_person.append(f"COUNT({q(f'__a{j}')}) AS __p{j}")
            elif kind in ("sum", "avg") and f"COUNT({q(f'__a{j}')}) AS __pc{j}" not in per_person:
                per_person.append(f"COUNT({q(f'__a{j}')}) AS __pc{j}")
    outer += _twin_columns(bp, pairs, per_person=True, key="__k")
    pp_group = f" GROUP BY {', '.join([*keys, PID])}"
    ctes.append(f"__pp AS (SELECT {', '.join(per_person)} FROM {source}{pp_group})")
    ctes.append(f"__cells AS (SELECT {', '.join(outer)} FROM __pp{group_by})")
    final = "SELECT __cells.*"
    joins = ""
    for name, sql in distinct_joins:
        ctes.append(f"{name} AS ({sql})")
        j = name[3:]
        final += f", {name}.__x{j}"
        if keys:
            cond = " AND ".join(f"__cells.{k} IS NOT DISTINCT FROM {name}.{k}" for k in keys)
            joins += f" LEFT JOIN {name} ON {cond}"
        else:
            joins += f" CROSS JOIN {name}"
    return f"WITH {', '.join(ctes)} {final} FROM __cells{joins}"


def population_sql(bp: BoundaryPlan) -> str:
    """Distinct persons selected by the boundary's filters, with their cell key."""
    return (f"WITH __rows AS ({bp.row_sql}), __pp AS (SELECT {PID}, SUM(DISTINCT {RKEY}) AS __k FROM __rows "
            f"GROUP BY {PID}) SELECT COUNT(*) AS __n, {cell_key_sql('SUM(__k)')} AS __ck FROM __pp")
