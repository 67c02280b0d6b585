"""What the policy and the query text say about a person's rows (DP contribution
bounds, ``protection.DPProtection``): a view declared one record per person, or one per
(person, C) — ``record_key: {record: C}`` or ``unique_per_person: [C, ...]`` — queried
with C fixed to one literal, gives one row and one group per person.
Decided from declarations and SQL only; the store is asked only which SQL enforces it.
"""

from __future__ import annotations

import threading

import numpy as np
from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.execution import Snapshot, fetch
from sekisho.guard.protect.threshold import number
from sekisho.guard.rewrite import BoundaryPlan
from sekisho.guard.row_identity import fixed_columns
from sekisho.policy import Policy, Value

def _row_query_fixes(select: exp.Expression | None, view: str, column: str | tuple[str, ...]) -> bool:
    """Whether every row of the boundary's row SELECT comes from a row of ``view`` whose
    ``column`` (each of the columns) the query text fixes to one literal (a top-level AND
    conjunct of the WHERE reading the view directly), through row-level SELECTs of one
    source each (no join, no grouping below the boundary, so no row is repeated)."""
    columns = (column,) if isinstance(column, str) else tuple(column)
    while isinstance(select, exp.Select):
        if select.args.get("joins") or select.args.get("laterals") or select.args.get("group"):
            return False
        from_ = select.args.get("from_") or select.args.get("from")
        source = from_.this if from_ is not None else None
        if isinstance(source, exp.Table):
            if source.name != view or source.args.get("db"):
                return False
            where = select.args.get("where")
            alias = source.alias_or_name
            if where is None:
                return False
            return set(columns) <= set(fixed_columns(alias, [where.this]))
        if not isinstance(source, exp.Subquery):
            return False
        select = source.this
    return False


def declared_row_identity(policy: Policy, bp: BoundaryPlan) -> tuple[str, ...] | None:
    """The view columns that identify one of the boundary's rows with its person, by the
    policy's declaration and the query text alone — never the data: ``(unit,)`` on a
    view declared ``record_key: person`` (its source's unique key is the person, checked
    on every upload); ``(unit, C)`` on a view declared ``record_key: {record: C}`` (unique
    key within (person, C)) when the query fixes ``C`` to one literal (``resident_tax``
    ``WHERE tax_year = 2026``); ``(unit, C1, ...)`` on a view declaring
    ``unique_per_person: [C1, ...]`` (checked on every upload) when the query fixes each
    to one literal (``childcare`` ``WHERE cert_ym = '2025-04'``). Then each person has at
    most one row, in one group.
    A join on the person key (``joins``) has bounds from its parts: when every part
    (anchor and INNER/LEFT-joined views) gives a person one row by the same declarations
    (SEMI/ANTI joins add no rows), so does the join — ``(unit,)``; the cells SQL then
    bounds each person to one row and one group (it never trusts the join to be unique).
    None elsewhere: joins with a part of several rows per person, joins to public views,
    household facts, unit scopes, views without a record key."""
    if bp.unit:
        return None
    if bp.has_join:
        view = policy.views.get(bp.personal_view)
        if getattr(bp, "join_one_row", False) and not getattr(bp, "household", False) and view is not None \
                and view.privacy_unit is not None:
            return (view.privacy_unit,)
        return None
    view = policy.views.get(bp.personal_view)
    if view is None or view.public or view.record_key is None or view.privacy_unit is None:
        return None
    record = view.record_key.record
    if record is None:
        return (view.privacy_unit,)
    declared = tuple(getattr(view, "unique_per_person", ()) or ())
    if declared and _row_query_fixes(bp.row, bp.personal_view, declared):
        # ``unique_per_person`` (checked on every upload): one row per person and values
        return (view.privacy_unit, *declared)
    if record.join is not None:
        return None
    # the view column holding the record column's raw value unchanged (rule keep)
    for col in view.columns.values():
        origin = col.origin
        if isinstance(origin, Value) and origin.join is None and origin.released.rule == "keep" \
                and origin.released.column == record.column and origin.released.name == record.column:
            if _row_query_fixes(bp.row, bp.personal_view, col.name):
                return (view.privacy_unit, col.name)
    return None


def groups_per_person(identities: tuple[tuple[str, ...], ...], bp: BoundaryPlan) -> int | None:
    """A bound on the groups — each of one row — a person has in the boundary, from a
    declared row identity the query partly fixes and partly groups by (``childcare``
    ``WHERE cert_ym = '2025-04' GROUP BY cert_type``: one row per person and 区分, at most
    one per 区分): the product of the public domains' sizes of the identity's columns the
    query groups by as bare keys. A join on the person key: the product over its parts
    (``BoundaryPlan.join_groups``, from the joins' analysis: every part one row per person
    per cell). None when no identity qualifies. The cells SQL enforces the bound (rows
    beyond it are dropped), so the noise is right even if the data broke the declaration
    (every upload checks it). ``identities``: the view's row identities
    (``catalog.ViewInfo.row_identities``)."""
    if bp.unit or getattr(bp, "household", False):
        return None
    if bp.has_join:
        return getattr(bp, "join_groups", None)
    grouped = {k.column.name: len(k.domain) for k in bp.group_keys
               if k.column is not None and k.column.view == bp.personal_view and k.domain}
    best = None
    for identity in identities:
        fixed = tuple(c for c in identity if c not in grouped)
        if len(fixed) == len(identity) or not _row_query_fixes(bp.row, bp.personal_view, fixed):
            continue
        size = 1
        for c in identity:
            if c in grouped:
                size *= grouped[c]
        best = size if best is None else min(best, size)
    return best


_UNIQUE_IN_STORE: dict[tuple[str, str, tuple[str, ...]], bool] = {}
_UNIQUE_LOCK = threading.Lock()


def unique_in_store(snap: Snapshot, view: str, columns: tuple[str, ...], deadline: float | None) -> bool:
    """Whether the snapshot holds at most one row of ``view`` per ``columns`` (cached per
    snapshot): the integrity of the declaration the bounds rest on. It only chooses the
    SQL that enforces the declared bound (no per-person bounding needed when true); the
    bound and the noise never depend on it."""
    key = (snap.id, view, columns)
    with _UNIQUE_LOCK:
        known = _UNIQUE_IN_STORE.get(key)
    if known is not None:
        return known
    cols = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
    name = '"' + view.replace('"', '""') + '"'
    cells = fetch(snap, f"SELECT COUNT(*) AS __n FROM (SELECT 1 FROM {name} GROUP BY {cols} "
                        f"HAVING COUNT(*) > 1 LIMIT 1)", deadline=deadline)
    unique = int(number(cells, hidden.CONTRIBUTORS, np.int64)[0]) == 0
    with _UNIQUE_LOCK:
        if len(_UNIQUE_IN_STORE) > 256:
            _UNIQUE_IN_STORE.clear()
        _UNIQUE_IN_STORE[key] = unique
    return unique
