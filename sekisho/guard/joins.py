"""Joins on the privacy unit and the linkage key below the aggregation boundary (issue 18).

Which columns may be joined is read from the policy, never from the query: a view's
``privacy_unit`` column is its *person key*, its ``linkage`` columns are *household
keys*, and two keys join only when both are keyed identifiers of the same namespace
(``keyed_id`` ``namespace``, e.g. ``atena`` for every ``person_id``). How many rows a
person has in a view is read from the view's ``record_key`` and ``unique_per_person``:
``person`` is one row per person; ``{record: C}`` is one row per person once the query
fixes ``C`` to one literal (``resident_tax`` with ``tax_year = 2025``), and so is a view
declaring ``unique_per_person: [C, ...]`` once the query fixes every one of those columns
(``childcare`` with ``cert_ym = '2025-04'``: one certification per child and 認定年月,
verified on every upload); anything else may be several. A fixing condition is a
top-level AND conjunct ``alias.C = <literal>`` or ``alias.C IN (<one literal>)`` of the
WHERE (or of the join's ON), or of the WHERE of a scope reading the join's rows, through
the bare output passing ``C`` on (``row_identity.OpenIdentity``); ranges, ORs and several
literals fix nothing.

Accepted shapes (each below one aggregation boundary; the person-level view in FROM is
the *anchor*):

* ``anchor [INNER|LEFT] JOIN <person view> ON a.person_id = b.person_id [AND <conditions>]``
  — at most one of the joined parts (anchor included) may give a person several rows,
  so a join never multiplies a person's rows beyond what one view holds (no fan-out
  amplification), and the same view is never joined to itself (``self_join``). A scope
  that only filters or passes on the join's rows leaves that to the scope reading them
  (``_fixable_above``: ibis writes a filter after a join one level up);
* ``anchor SEMI|ANTI JOIN <person view> ON a.person_id = b.person_id [AND ...]`` — also
  written ``a.person_id [NOT] IN (SELECT person_id FROM v WHERE ...)`` or ``[NOT] EXISTS
  (SELECT ... FROM v WHERE v.person_id = a.person_id AND ...)`` (``semi_joins`` turns
  these into SEMI/ANTI joins before the scopes are classified); they filter, never add rows;
* ``anchor [INNER|LEFT] JOIN <unit scope> ON a.household_id = u.household_id`` — persons
  joined to their household's features (many-to-one: one unit row per household), and
  ``a.household_id [IN|EXISTS] (... household_id FROM v ...)`` — persons whose household
  has a member in ``v``. Rows then carry *household* facts, so the household becomes the
  contributor (``rewrite`` carries the household key as ``__pid``): k counts households,
  the cell key sums the member records, dominance is per household. Rows without a
  household are left out. Not available in DP mode (one person would change the rows of
  every member of their household: no bound from the policy).

Anything else between two person-level sources is ``personal_join``. Counting, cell keys
and dominance are per contributor whatever the join (``cells`` groups by ``__pid``);
SUM/AVG of a measure whose view is not the one part with several rows per person would
repeat the measure once per row of the other view, and is refused (``join_fan_out``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sqlglot import exp

from sekisho.guard.catalog import LINKAGE, PRIVACY_UNIT, Catalog
from sekisho.guard.errors import QueryRefused, refuse
from sekisho.guard.scope_checks import is_aggregate_scope, owned_by
from sekisho.guard import row_identity
from sekisho.guard.row_identity import OpenIdentity
from sekisho.guard.semi_joins import ANTI, SEMI, conjuncts

KEY_CLASSES = (PRIVACY_UNIT, LINKAGE)
# meta flags on nodes the guard writes (read by ``neighbours``): a join whose existence is
# a condition of the query, and a condition that is structure (never left out)
EXISTENCE = "sekisho_join_existence"
STRUCTURAL = "sekisho_structural"
# ... and a condition that fixes a row identity the join's bounds rest on (``C = lit``): the
# condition-influence rule may not leave it out (the rows would fan out), it refuses instead
ROW_IDENTITY = "sekisho_row_identity"


# ---- classification of a scope's joins ------------------------------------------------------
@dataclass
class RowInfo:
    """What the joins below (and at) one row-level scope mean for its contributors."""
    views: tuple[str, ...] = ()              # person-level views whose rows make the rows (INNER/LEFT parts)
    multi: frozenset[str] = frozenset()      # ... of those, views that may give a person several rows
    # ... views with one row per person in each cell (a row identity's columns fixed or
    # bare group keys of this scope) but possibly several in all (several cells)
    per_cell: frozenset[str] = frozenset()
    # ... and for each, in how many cells a person's rows can fall (None: not bounded)
    per_cell_groups: dict[str, int | None] = field(default_factory=dict)
    household: bool = False                  # rows carry household facts: the household is the contributor
    person_joins: bool = False               # a join on a key somewhere below or here
    public_join: bool = False
    household_key: exp.Column | None = None  # at this scope: the column carried as the contributor
    rkey_alias: str | None = None            # at this scope: the source whose _rkey is the record key
    handled: set[int] = field(default_factory=set)   # ids of the joins checked here
    # ... the conditions fixing a row identity at this scope or below (marked ``ROW_IDENTITY``
    # by the scope with the join), and each identity of a ``multi`` view only partly fixed
    # here whose other columns this scope passes through: a scope reading it may fix or
    # group by them (``WHERE t.cert_ym = ...`` inside ``(SELECT * FROM childcare ...) t``)
    identity_nodes: tuple[exp.Expression, ...] = ()
    open_identities: tuple[OpenIdentity, ...] = ()


def _namespace(lineage) -> str | None:
    base = getattr(lineage, "base", None)
    return getattr(base, "namespace", None)


def _key_pair(on: exp.Expression, right: str, left_aliases: set[str], column_lineage
              ) -> tuple[exp.Column, exp.Column, str, list[exp.Expression]]:
    """Split a join's ON into its key equality (left column, right column, key class) and
    the other conditions. Exactly one conjunct compares a key of the joined source with
    the same kind of key (same namespace) of an earlier source."""
    keys, rest = [], []
    for part in conjuncts(on):
        if isinstance(part, exp.EQ) and isinstance(part.this, exp.Column) and isinstance(part.expression, exp.Column):
            a, b = part.this, part.expression
            if b.table != right:
                a, b = b, a
            if b.table == right and a.table in left_aliases:
                la, lb = column_lineage(a), column_lineage(b)
                if la.cls in KEY_CLASSES and la.cls == lb.cls:
                    na, nb = _namespace(la), _namespace(lb)
                    if na is not None and na == nb:
                        keys.append((a, b, la.cls))
                        continue
                    raise refuse("personal_join", part)   # keys of different kinds of identifier
        rest.append(part)
    if len(keys) != 1:
        raise refuse("personal_join", on)
    return (*keys[0], rest)


def scope_links(select: exp.Select, env: dict, sources: list[tuple[str, str, object]], catalog: Catalog,
                infos: dict[int, RowInfo], *, row: str, unit: str, public: str,
                condition: Callable[[exp.Expression], None], column_lineage) -> RowInfo | None:
    """Check the joins of a scope whose FROM is a person-level source (``row`` level) and
    return what they mean for its contributors; None when FROM is not person-level (the
    classifier's other rules apply). Joins to public views are left to the classifier."""
    from_ = select.args.get("from_")
    first = from_.this if from_ is not None else None
    by_alias = {alias: (level, source) for alias, level, source in sources}
    if first is None or by_alias.get(first.alias_or_name, (None,))[0] != row:
        return None
    anchor_alias = first.alias_or_name
    anchor_level, anchor = by_alias[anchor_alias]
    where = select.args.get("where")
    where_parts = [where.this] if where is not None else []

    grouped = row_identity.grouped_columns(select)
    identity_conditions: list[exp.Expression] = []

    open_here: list[tuple[str, str, tuple[str, ...], tuple]] = []   # (alias, view, columns, nodes)

    def part_info(alias: str, source, fixing: list[exp.Expression]) -> RowInfo:
        if isinstance(source, exp.Table):
            multi, per_cell, nodes, still_open, groups = row_identity.part_rows(catalog, alias, source, fixing,
                                                                                 grouped)
            identity_conditions.extend(nodes)
            open_here.extend((alias, *o) for o in still_open)
            return RowInfo(views=(source.name,), multi=multi, per_cell=per_cell, per_cell_groups=groups)
        inner = infos.get(id(source.expression), RowInfo())
        # a row-level subquery's cells are this scope's: what was one per cell there is not
        # here; the identities it left open may be fixed or grouped here through its outputs
        inner = replace(inner, multi=inner.multi | inner.per_cell, per_cell=frozenset())
        multi, per_cell, nodes, still_open, groups = row_identity.part_rows(catalog, alias, source, fixing, grouped,
                                                                             inner)
        identity_conditions.extend(inner.identity_nodes)
        identity_conditions.extend(nodes)
        open_here.extend((alias, *o) for o in still_open)
        return replace(inner, multi=multi, per_cell=per_cell, per_cell_groups=groups, identity_nodes=(),
                       open_identities=())

    info = part_info(anchor_alias, anchor, where_parts)
    info = replace(info, household_key=None, rkey_alias=None, handled=set())
    seen = [anchor_alias]
    semi_aliases: dict[str, exp.Join] = {}
    person_tables: list[tuple[str, exp.Table]] = [(anchor_alias, anchor)] if isinstance(anchor, exp.Table) else []
    for join in select.args.get("joins") or []:
        alias = join.this.alias_or_name
        level, source = by_alias.get(alias, (None, None))
        kind = (join.kind or "").upper()
        side = (join.side or "").upper()
        if level == public:
            info.public_join = True
            seen.append(alias)
            continue
        if level not in (row, unit):
            seen.append(alias)
            continue   # the classifier refuses it
        on = join.args.get("on")
        if on is None:
            raise refuse("personal_join", join)
        left_col, _, key_cls, rest = _key_pair(on, alias, set(seen), lambda c: column_lineage(c, env))
        if kind in (SEMI, ANTI):
            if side or level != row:
                raise refuse("join_not_allowed", join)
            semi_aliases[alias] = join
            join.meta[EXISTENCE] = True
        elif kind in ("", "INNER", "OUTER") and side in ("", "LEFT") and not (kind == "OUTER" and side != "LEFT"):
            if level == row and key_cls != PRIVACY_UNIT:
                # person rows joined to person rows of the same household: every pair of
                # members, a many-to-many join — households join as unit scopes
                raise refuse("personal_join", join)
            if side != "LEFT":
                join.meta[EXISTENCE] = True
        else:
            raise refuse("join_not_allowed", join)
        for part in rest:
            condition(part)
        info.handled.add(id(join))
        info.person_joins = True
        if key_cls == LINKAGE:
            if info.household_key is not None and info.household_key != left_col:
                raise refuse("personal_join", join)
            info.household = True
            info.household_key = left_col
        if level == row and kind not in (SEMI, ANTI):
            part = part_info(alias, source, where_parts + [on])
            if part.household:
                raise refuse("join_not_allowed", join)   # household facts only through the anchor
            info.views = info.views + part.views
            info.multi = info.multi | part.multi
            info.per_cell = info.per_cell | part.per_cell
            info.per_cell_groups = {**info.per_cell_groups, **part.per_cell_groups}
            info.public_join = info.public_join or part.public_join
            if isinstance(source, exp.Table):
                person_tables.append((alias, source))
            if side == "LEFT":
                # every column of a LEFT-joined part is NULL where nothing matched: its person
                # key is then not the contributor, and a group key's domain gains NULL
                for name, lineage in list(env.get(alias, {}).items()):
                    env[alias][name] = replace(lineage, nullable=True)
        seen.append(alias)
    if len(set(info.views)) < len(info.views):
        raise refuse("self_join", select.args["joins"][0])
    if info.person_joins:
        # the join's rows are one per person (per cell) because of these conditions
        for node in identity_conditions:
            node.meta[ROW_IDENTITY] = True
    info.identity_nodes = tuple(identity_conditions)
    # identities left open here, named as this scope's outputs (a scope reading it may close them)
    passed = {alias: row_identity.outputs_of(select, alias) for alias in {a for a, *_ in open_here}}
    info.open_identities = tuple(
        OpenIdentity(view, tuple(passed[alias][c] for c in columns), nodes)
        for alias, view, columns, nodes in open_here
        if view in info.multi and all(c in passed[alias] for c in columns))
    if len(info.multi) > 1 and not _fixable_above(select, info):
        raise row_identity.fan_out(catalog, info.multi, ", ".join(sorted(info.multi)))
    for alias, join in semi_aliases.items():
        _only_in_own_on(select, alias, join)
    if not info.person_joins and not info.handled:
        info.public_join = info.public_join or any(by_alias.get(j.this.alias_or_name, (None,))[0] == public
                                                   for j in select.args.get("joins") or [])
    # the record key of the contributor: a view with one record per person, joined INNER
    # (``residents``), so the same persons get the same key whichever view is the anchor
    for alias, table in person_tables:
        joined = next((j for j in select.args.get("joins") or [] if j.this is table), None)
        if catalog.views[table.name].person_unique and (joined is None or not (joined.side or "")):
            info.rkey_alias = alias
            break
    return info


def _fixable_above(select: exp.Select, info: RowInfo) -> bool:
    """Whether the fan-out of a scope with several views of several rows per person is
    decided by the scopes reading its rows: it aggregates nothing (its rows are only
    filtered or passed on), and every such view passes on an identity left open, so a
    reader may still fix it (ibis writes a filter after a join as ``SELECT * FROM (<the
    join>) WHERE tax_year = 2026 AND cert_ym = ...``). Each reader's ``scope_links``
    closes the identities its WHERE fixes (through the outputs' names) and refuses while
    two views stay several; any other reader of row-level rows is refused by the
    classifier, and SEMI/ANTI joins only test existence."""
    return not is_aggregate_scope(select) and all(
        any(o.view == view for o in info.open_identities) for view in info.multi)


def _only_in_own_on(select: exp.Select, alias: str, join: exp.Join) -> None:
    """Columns of a SEMI/ANTI-joined source exist only in that join's ON."""
    on = join.args.get("on")
    inside = {id(n) for n in on.walk()} if on is not None else set()
    for col in select.find_all(exp.Column):
        if col.table == alias and id(col) not in inside and owned_by(col, select):
            raise refuse("semi_join_column", col)


def check_measures(aggregates, info: RowInfo | None, catalog: Catalog | None = None) -> None:
    """SUM/AVG of a measure of a view that is not the one part with several rows per
    person would count the measure once per row of that other view (fan-out)."""
    if info is None or not info.multi:
        return
    for agg in aggregates:
        if agg.kind in ("sum", "avg") and agg.measure is not None:
            view = agg.measure.split(".", 1)[0]
            if view not in info.multi:
                part = f"{agg.measure} × {', '.join(sorted(info.multi))}"
                if catalog is None:
                    raise QueryRefused("join_fan_out", part=part)
                raise row_identity.fan_out(catalog, info.multi, part)


def structural_not_null(column: exp.Column) -> exp.Expression:
    """``NOT <key> IS NULL``, marked as the guard's own structure (never an atom)."""
    node = exp.Not(this=exp.Is(this=column.copy(), expression=exp.Null()))
    node.meta[STRUCTURAL] = True
    return node
