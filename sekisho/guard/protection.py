"""Stage 4 of a query: protection — one implementation per mode, registered by name.

(Over 400 lines on purpose: the two implementations are meant to be read side by side
against the one ``Protection`` protocol, with the context, release type, post-processing
and summary they share; their mechanisms already live in ``protect``, ``cells`` and
``influence``.)

A ``Protection`` turns a plan into released tables: it owns its cells SQL (``cells``),
its protection of them (``protect``), the post-processing call and its notes for the
reader. ``PROTECTIONS`` maps the policy's mode names to them:

* ``threshold`` — condition influence (``influence``), cells with contributor counts and
  cell keys, k-thresholds after perturbation, dominance rules, consistent cell-key noise;
* ``dp`` — the budget debited first (``budget``), contributions bounded per person
  (bounds from the policy's declarations and the query text: ``dp_bounds``),
  exact discrete Laplace noise on counts and fixed-point sums, partition selection
  (``protect.dp``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from sekisho.guard import budget as ledger
from sekisho.guard import cell_splice, cell_widening, hidden, influence, twins
from sekisho.guard.catalog import IDENTIFIER_CLASSES, Catalog
from sekisho.guard.cells import Bounding, cells_sql, population_sql, twin_pairs
from sekisho.guard.dp_bounds import declared_row_identity, groups_per_person, unique_in_store
from sekisho.guard.errors import QueryRefused
from sekisho.guard.execution import PostProcessor, Snapshot, fetch, protected_schema, to_arrow
from sekisho.guard.protect import status as cell_status
from sekisho.guard.protect.carry import carry, is_companion
from sekisho.guard.protect.cellkey import KEY_RANGE, SUM_NOISE_FRACTION
from sekisho.guard.protect.domains import narrowed_domains
from sekisho.guard.protect.dp import DPParams, protect_dp
from sekisho.guard.protect.threshold import (CONTRIBUTOR_COUNTS, COUNT_KINDS, Cells, ProtectionStats, number,
                                            protect_threshold)
from sekisho.guard.rewrite import BoundaryPlan, Plan
from sekisho.guard.session import Session
from sekisho.instance import Instance
from sekisho.policy import Policy
from sekisho.protocol import cells_table

# DP on unit rows, privacy unit still the person: a person is in exactly one unit row
# (person-unique view; each unit bounded to one row and one cell), so adding or removing
# them changes one unit's features — it leaves one cell and enters another: at most 2
# cells change, each by 1 (L1 sensitivity 2), which calibrates both noise and selection.
UNIT_DP_SENSITIVITY = 2
# how a note names what a left-out condition was answered as (``influence.treated_as``)
TREATED_AS_JA = {"TRUE": "常に成り立つものとして集計", "FALSE": "成り立たないものとして集計"}


@dataclass(frozen=True)
class Context:
    """What a protection needs to answer one plan."""
    policy: Policy
    instance: Instance
    session: Session
    plan: Plan
    snap: Snapshot
    catalog: Catalog
    post: PostProcessor
    verdicts: influence.VerdictCache
    deadline: float | None = None   # time.monotonic() by which every statement must be done


@dataclass
class Released:
    table: pa.Table
    stats: list[ProtectionStats]
    left_out: list[str] = field(default_factory=list)      # conditions the influence rule left out
    treated_as: list[str] = field(default_factory=list)    # ... each answered as TRUE or FALSE
    # per boundary what defines its population: (snapshot id, row SQL as executed), or None
    defined: list[tuple[str, str] | None] = field(default_factory=list)
    # per boundary its non-empty cells' group-key columns and its row SELECT as answered
    # (a tree, read only) (threshold mode), for the regions each release splits
    # (``regions``, on the bookkeeping thread); never leave the service
    cell_keys: list[dict | None] = field(default_factory=list)
    row_trees: list = field(default_factory=list)
    epsilon_spent: float = 0.0
    epsilon_remaining: float | None = None
    # per-cell status and accuracy, row-aligned with ``table`` (``sekisho.protocol``), or
    # None when the answer has no protected values or post-processing was not followed
    cells: pa.Table | None = None
    accuracy: dict[str, str] = field(default_factory=dict)   # answer column -> accuracy kind
    narrowed: bool = False     # a public domain was narrowed to the query's own filters
    influenced_cells: int = 0  # cells suppressed: their per-cell query was not computed (cell_widening)
    twins_equalized: int = 0   # answers made equal to a twin fewer than k apart (twins)
    # (the two counts above stay in the service: how many depends on the data; the answer
    # says only that the per-cell rules applied, which the query text decides)
    cells_checked: bool = False


class Protection(Protocol):
    name: str

    def release(self, ctx: Context) -> Released: ...

    def notes(self, policy: Policy, plan: Plan, released: Released) -> list[str]: ...

    def perturbation(self, policy: Policy) -> dict | None: ...


def one_row_per_contributor(bp: BoundaryPlan, snap: Snapshot, catalog: Catalog) -> bool:
    """Whether the boundary's rows are its contributors (a person-unique view, no join):
    then cells are counted in one pass without grouping by person."""
    unit = catalog.views[bp.personal_view].privacy_unit
    person_unique = snap.is_person_unique(bp.personal_view, unit)
    if bp.unit:
        # k units imply k persons only when each person is in exactly one unit row
        if not person_unique:
            raise QueryRefused("unit_view_not_person_unique", part=bp.personal_view)
        return not bp.has_join      # unit rows are one per linkage key by construction
    return not bp.has_join and person_unique


def counts_contributors_only(bp: BoundaryPlan) -> bool:
    """Whether the boundary's cells SQL over one row per contributor has no column but
    the group keys, ``__n`` and ``__ck`` (``cells.cells_sql``): every aggregate counts the
    cell's contributors, so no twins either."""
    return bool(bp.group_keys) and all(agg.kind in CONTRIBUTOR_COUNTS for agg in bp.aggregates)


def _keyed_as_asked(own: Cells, bp: BoundaryPlan, snap: Snapshot) -> Cells | None:
    """The influence scan's own cells with each group key of the type the cells SQL gives
    it (``protected_schema``): a unit scope's keys come through a UNION with other parts
    (``COUNT(*)``, BIGINT, came back as HUGEINT: Decimal values, which the per-cell rule's
    tests of the keys did not read as numbers). None when a key does not convert: then
    the cells are scanned."""
    out = dict(own)
    for j, key_field in enumerate(list(protected_schema(bp, snap))[:len(bp.group_keys)]):
        column = out.get(hidden.group_key(j))
        if isinstance(column, pa.Array) and column.type != key_field.type:
            try:
                out[hidden.group_key(j)] = column.cast(key_field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                return None
    return out


def _memo_on_plan(bp: BoundaryPlan, attribute: str, key, build):
    """SQL written once per cached plan's boundary (and ``key``), kept on the boundary."""
    memo = getattr(bp, attribute, None)
    if memo is None:
        memo = {}
        object.__setattr__(bp, attribute, memo)
    if key not in memo:
        memo[key] = build()
    return memo[key]


def _identifiers(catalog: Catalog) -> frozenset[str]:
    """The catalog's identifier columns (privacy unit, linkage keys), once per catalog
    (a catalog is built per role and snapshot and not changed after)."""
    names = getattr(catalog, "_identifier_names", None)
    if names is None:
        names = frozenset(c.name for v in catalog.views.values() for c in v.columns.values()
                          if c.cls in IDENTIFIER_CLASSES)
        catalog._identifier_names = names
    return names


def _domains(bp: BoundaryPlan) -> list:
    return [k.domain for k in bp.group_keys]


def answered_row(bp: BoundaryPlan, run: BoundaryPlan) -> exp.Select | None:
    """The row SELECT a boundary was answered with as a tree: the plan's, or the one
    condition influence left (parsed once per cached plan and verdict). Read only."""
    if run.row_sql == bp.row_sql:
        return bp.row
    return _memo_on_plan(bp, "_answered_row", run.row_sql, lambda: sqlglot.parse_one(run.row_sql, read="duckdb"))


def _answered_domains(ctx: Context, bp: BoundaryPlan, run: BoundaryPlan) -> tuple[list, bool]:
    """The public domains of ``bp``'s keys, narrowed to the values the row SELECT it is
    answered with (``run``: after condition influence) can select (``protect.domains``);
    and whether any was narrowed. Decided from the query text and the domains alone."""
    domains = _domains(bp)
    if not any(domains) or not _memo_on_plan(bp, "_has_where", None, lambda: bp.row is not None
                                             and any(True for _ in bp.row.find_all(exp.Where))):
        return domains, False

    def build():
        row = answered_row(bp, run)
        types = [f.type for f in protected_schema(bp, ctx.snap)][:len(domains)]
        return narrowed_domains(row, domains, types, ctx.post.connection)

    narrowed = _memo_on_plan(bp, "_narrowed", run.row_sql, build)
    return narrowed, any(a != b for a, b in zip(narrowed, domains))


def accuracy_kinds(mode: str, bp: BoundaryPlan, perturb: bool = True) -> list[str]:
    """The accuracy each aggregate of ``bp`` states per cell (``protect.status``)."""
    if mode == "dp":
        return [cell_status.DP_INTERVAL] * len(bp.aggregates)
    kinds = []
    for agg in bp.aggregates:
        bounds = getattr(agg, "bounds", None)
        if agg.kind in COUNT_KINDS:
            kinds.append(cell_status.CELL_KEY)
        elif agg.kind == "sum" and bounds is not None and bounds[0] >= 0:
            kinds.append(cell_status.SUM_RELATIVE)
        else:
            kinds.append(cell_status.NO_INTERVAL)
    return kinds


def _status_table(frame: Cells, bp: BoundaryPlan, rows: int) -> pa.Table:
    """The companions of a protected table: status and interval per aggregate."""
    arrays, names = [], []
    for j in range(len(bp.aggregates)):
        for name, typ in ((cell_status.status_column(j), pa.string()), (cell_status.low_column(j), pa.float64()),
                          (cell_status.high_column(j), pa.float64())):
            values = frame.get(name)
            arrays.append(pa.nulls(rows, type=typ) if values is None else
                          pa.array(values, type=typ, from_pandas=True))
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def post_process(ctx: Context, protected: dict[str, pa.Table], companions: dict[str, pa.Table],
                 kinds: dict[str, list[str]]) -> tuple[pa.Table, pa.Table | None, dict[str, str]]:
    """Post-processing with status and accuracy carried to the answer's rows
    (``protect.carry``): (answer, cells table or None, answer column -> accuracy kind)."""
    plan = ctx.plan
    if not plan.boundaries:
        return ctx.post.run(plan, protected, ctx.snap, ctx.catalog, deadline=ctx.deadline), None, {}
    if plan.passthrough is not None and not plan.public_views:
        table = ctx.post.run(plan, protected, ctx.snap, ctx.catalog, deadline=ctx.deadline)
        bp = plan.boundaries[0]
        comp = companions[bp.name]
        columns, seen = [], set()
        for src, out in plan.passthrough:
            if src.startswith("__v") and out not in seen:
                j = int(src[3:])
                seen.add(out)
                columns.append((out, comp.column(cell_status.status_column(j)), comp.column(cell_status.low_column(j)),
                                comp.column(cell_status.high_column(j)), kinds[bp.name][j]))
        return table, cells_table(table.num_rows, columns), {c[0]: c[4] for c in columns}
    carried = _memo_on_plan(plan, "_carried", tuple(tuple(k) for k in kinds.values()),
                            lambda: carry(plan.post_sql, kinds))
    if carried is None:
        return ctx.post.run(plan, protected, ctx.snap, ctx.catalog, deadline=ctx.deadline), None, {}
    joined = {}
    for name, table in protected.items():
        extra = companions.get(name)
        joined[name] = table if extra is None else pa.Table.from_arrays(
            table.columns + extra.columns, names=table.column_names + extra.column_names)
    try:
        full = ctx.post.run(dataclasses.replace(plan, post_sql=carried.sql, passthrough=None), joined, ctx.snap,
                            ctx.catalog, deadline=ctx.deadline)
    except QueryRefused as e:
        if e.code != "execution_failed":
            raise
        return ctx.post.run(plan, protected, ctx.snap, ctx.catalog, deadline=ctx.deadline), None, {}
    keep = [i for i, name in enumerate(full.column_names) if not is_companion(name)]
    table = full.select(keep)
    columns, seen = [], set()
    for name in table.column_names:
        comp = carried.columns.get(name.lower())
        if comp is None or name in seen:
            continue
        seen.add(name)
        columns.append((name, full.column(comp.status), full.column(comp.low), full.column(comp.high), comp.kind))
    return table, cells_table(table.num_rows, columns), {c[0]: c[4] for c in columns}


class ThresholdProtection:
    name = "threshold"

    def release(self, ctx: Context) -> Released:
        d = ctx.policy.disclosure
        protected, released = {}, Released(table=None, stats=[])
        companions, kinds = {}, {}
        for bp in ctx.plan.boundaries:
            fast = one_row_per_contributor(bp, ctx.snap, ctx.catalog)
            run, left_out, counted, worlds, own = self._apply_influence(ctx, bp, fast) \
                if ctx.session.condition_influence else (bp, (), None, cell_widening.NONE, None)
            # the rows the query (as run) selects are one per contributor: the view's, or
            # by a declared row identity the query fixes and the store holds (run unchanged)
            one_row = fast or (not left_out and self._declared_one_row(ctx, bp))
            own = _keyed_as_asked(own, bp, ctx.snap) if own is not None and fast and counts_contributors_only(bp) \
                else None
            if own is not None:
                cells = own   # the influence scan counted exactly the cells SQL's columns
            else:
                cells = fetch(ctx.snap, self._cells_sql(run, one_row), prepared_for=ctx.session.user,
                              deadline=ctx.deadline)
            population = self._check_population(ctx, run, cells, one_row, counted) if bp.filtered else None
            groups = [hidden.group_key(j) for j in range(len(bp.group_keys))]
            cells, resolution, influenced = self._per_cell(ctx, run, cells, groups, worlds, fast,
                                                           (ctx.session.user, ctx.snap.id, bp.row_sql))
            released.influenced_cells += influenced
            domains, narrowed = _answered_domains(ctx, bp, run)
            released.narrowed |= narrowed
            frame, st = protect_threshold(cells, bp.aggregates, domains, k=d.k, table=ctx.snap.ptable,
                                          min_count=d.perturbation.min_count, nk_n=d.dominance.nk_n,
                                          nk_k=d.dominance.nk_k, p_percent=d.dominance.p_percent,
                                          perturb=d.perturbation.enabled)
            frame = cell_splice.mark(frame, resolution, bp.aggregates, k=d.k,
                                       max_noise=ctx.snap.ptable.max_noise if d.perturbation.enabled else 0)
            # (a role trusted without condition influence — the reports service — is answered as asked)
            frame, equalized = twins.equalize_twins(
                frame, cells, twin_pairs(bp) if ctx.session.condition_influence else [], len(bp.group_keys),
                ctx.snap.ptable, d.k)
            released.twins_equalized += equalized
            released.cells_checked |= bool(bp.group_keys) and ctx.session.condition_influence
            st.population = population
            for condition, answered_as in left_out:
                if (condition, answered_as) not in zip(released.left_out, released.treated_as):
                    released.left_out.append(condition)
                    released.treated_as.append(answered_as)
            protected[bp.name] = to_arrow(frame, bp, ctx.snap)
            companions[bp.name] = _status_table(frame, bp, protected[bp.name].num_rows)
            kinds[bp.name] = accuracy_kinds(self.name, bp)
            released.stats.append(st)
            released.defined.append((ctx.snap.id, run.row_sql))
            # the cells' keys, and their contributors and cell keys (``cell_pairs``)
            released.cell_keys.append({**{name: cells[name] for name in
                                          [hidden.group_key(j) for j in range(len(bp.group_keys))]
                                          + [hidden.CONTRIBUTORS, hidden.CELL_KEY] if name in cells},
                                       hidden.ONE_ROW_EACH: fast})
            released.row_trees.append(answered_row(bp, run))
        released.table, released.cells, released.accuracy = post_process(ctx, protected, companions, kinds)
        return released

    @staticmethod
    def _cells_sql(bp: BoundaryPlan, person_unique: bool) -> str:
        return _memo_on_plan(bp, "_cells_sql", person_unique,
                             lambda: cells_sql(bp, person_unique=person_unique, twins=True))

    def _per_cell(self, ctx: Context, run: BoundaryPlan, cells: Cells, groups: list[str],
                  plan: cell_widening.CellWorlds, fast: bool, verdict_key: tuple[str, str, str]
                  ) -> tuple[Cells, cell_splice.Resolution | None, int]:
        """Each cell answered as the query ``cell_widening`` resolves for it: one more cells
        statement per distinct query, its cells kept per user and snapshot with the
        verdicts (a repeated query does not scan them again). Returns the
        cells, the resolution (for ``cell_splice.mark``) and how many cells had no world."""
        if not plan or not groups:
            return cells, None, 0
        keys = list(zip(*(cells[g].to_pylist() for g in groups)))
        before = plan.second_tiers()
        resolution = plan.resolve(keys, fetch=lambda sql: fetch(ctx.snap, sql, deadline=ctx.deadline))
        if plan.second_tiers() != before:   # a second tier counted: the kept verdict grew
            ctx.verdicts.account(verdict_key)
        world_cells = {}
        for sql in sorted(resolution.worlds()):
            cells_sql_text = self._cells_sql(dataclasses.replace(run, row_sql=sql, row=None), fast)
            world_cells[sql] = ctx.verdicts.world_cells(
                (ctx.session.user, ctx.snap.id, cells_sql_text),
                lambda q=cells_sql_text: fetch(ctx.snap, q, prepared_for=ctx.session.user, deadline=ctx.deadline))
        cells, suppressed = cell_splice.splice(cells, keys, groups, resolution, world_cells,
                                               ptable=ctx.snap.ptable, k=ctx.policy.disclosure.k)
        return cells, resolution, suppressed

    @staticmethod
    def _declared_one_row(ctx: Context, bp: BoundaryPlan) -> bool:
        """Whether the boundary's rows are one per person by a declared row identity the
        query text fixes (``dp_bounds.declared_row_identity``: ``resident_tax`` ``WHERE
        tax_year = 2025``) and the snapshot holds at most one row per identity
        (``unique_in_store``, once per snapshot): then its cells are counted in one pass
        without grouping by person, and the counts, cell keys and sums are the same. One
        view, no join, no unit scope."""
        if bp.unit or bp.has_join:
            return False
        identity = declared_row_identity(ctx.policy, bp)
        if identity is None or len(identity) < 2:
            return False   # (unit,): the view itself is person-unique or not (``fast``)
        return unique_in_store(ctx.snap, bp.personal_view, identity, ctx.deadline)

    @staticmethod
    def _apply_influence(ctx: Context, bp: BoundaryPlan, fast: bool):
        """The boundary as the condition-influence rule lets it run (``influence.decide``,
        cached per user and snapshot), the conditions it left out, the contributors
        and cell key of the query as run when the rule's last scan counted them (else
        None), the cells the query is answered as (``cell_widening``) and the query's own
        cells when the rule's scan counted them just now (``Verdict.own_cells``)."""
        identifiers = _identifiers(ctx.catalog)
        columns = [hidden.group_key(j) for j in range(len(bp.group_keys))] + \
            [hidden.argument(j) for j, agg in enumerate(bp.aggregates) if agg.arg is not None]
        verdict = ctx.verdicts.verdict(
            (ctx.session.user, ctx.snap.id, bp.row_sql),
            lambda: influence.decide(bp.row, columns=columns, identifiers=identifiers, k=ctx.policy.disclosure.k,
                                     filtered=bp.filtered, person_unique=fast and not bp.unit,
                                     ptable=ctx.snap.ptable, fetch=lambda sql: fetch(ctx.snap, sql, deadline=ctx.deadline),
                                     catalog=ctx.catalog))
        if not verdict.left_out:
            return bp, (), verdict.population, verdict.cell_worlds, verdict.own_cells
        # (own cells, when counted, are of the query as run: the rule's last round)
        return dataclasses.replace(bp, row_sql=verdict.row_sql), tuple(zip(verdict.left_out, verdict.treated_as)), \
            verdict.population, verdict.cell_worlds, verdict.own_cells

    @staticmethod
    def _check_population(ctx: Context, bp: BoundaryPlan, cells: Cells, fast: bool,
                          counted: tuple[int, int] | None = None) -> tuple[int, int]:
        """Refuse when the filtered population is below k — on a perturbed count, so the
        decision itself carries the same noise as any released count. Returns the
        population's true size and cell key (for the differencing/decomposition alerts).
        ``counted``: the population as condition influence's last scan counted it (the
        query as run: the same contributors and key as ``population_sql``), if it did."""
        if fast:   # the cells partition the filtered persons: their counts and keys add up
            n = int(cells[hidden.CONTRIBUTORS].sum())
            # perturb_count takes it mod KEY_RANGE; an empty population's key is NULL (NaN)
            ck = int(np.nansum(cells[hidden.CELL_KEY]))
        elif counted is not None:
            n, ck = counted
        else:
            pop = fetch(ctx.snap, population_sql(bp), prepared_for=ctx.session.user, deadline=ctx.deadline)
            n = int(number(pop, hidden.CONTRIBUTORS, np.int64)[0])
            ck = int(number(pop, hidden.CELL_KEY, np.int64)[0])
        if ctx.snap.ptable.perturb_count(ck, n) < ctx.policy.disclosure.k:
            raise QueryRefused("filter_population_below_k")
        return n, ck % KEY_RANGE   # the population's identity: same contributors, same (n, key)

    def notes(self, policy: Policy, plan: Plan, released: Released) -> list[str]:
        k, p = policy.disclosure.k, policy.disclosure.perturbation
        notes = [f"{k}人未満のセルは秘匿しています（表では X、データでは空の値）。"]
        if any(bp.unit or getattr(bp, "household", False) for bp in plan.boundaries):
            notes.append(f"世帯単位の集計では、{k}世帯未満のセルを秘匿しています。")
        notes.append(f"件数にはセルキー法による小さな攪乱（±{p.max_noise}以内）を加えています。")
        if released.left_out:
            notes.append(f"対象者を{k}人以上変えない条件は適用していません（差分による特定の防止）: "
                         + "; ".join(f"{c}（{TREATED_AS_JA[t]}）" for c, t in zip(released.left_out, released.treated_as)))
        if released.cells_checked:
            notes.append(f"セルごとに、そのセルの対象者を{k}人未満しか変えない条件（0人を含む）は適用していません"
                         f"（状態 widened、表では †。件数の誤差幅はその分広げています）。同じ種類の集計どうしで対象者が"
                         f"{k}人未満しか違わないものは同じ値で回答しています（セル単位の差分による特定の防止）。")
        if any(s.values_suppressed_dominance for s in released.stats):
            notes.append("少数の者が大部分を占める合計・平均は秘匿しています（優越性ルール）。")
        if any(not s.densified for s in released.stats) and any(bp.group_keys for bp in plan.boundaries):
            notes.append("公開された値域のない区分では、秘匿対象の区分は表示されません。")
        if released.narrowed:
            notes.append("区分の値は、照会の条件（適用した条件）で選ばれ得るものだけを示しています。")
        return notes

    def perturbation(self, policy: Policy) -> dict | None:
        p = policy.disclosure.perturbation
        return {"method": "cell-key", "max_noise": p.max_noise, "variance": p.variance} if p.enabled else None


class DPProtection:
    name = "dp"

    def release(self, ctx: Context) -> Released:
        dp, plan = ctx.policy.disclosure.dp, ctx.plan
        eps = ctx.session.epsilon
        clamps = [self._clamps(bp, ctx) for bp in plan.boundaries]   # refusals before any debit
        period = ledger.current_period(dp.period)
        spent = eps if plan.boundaries else 0.0
        if spent:
            try:
                remaining = ledger.debit(ctx.instance, ctx.session.user, period, spent, dp.budget_per_period,
                                         plan.fingerprint)
            except ledger.BudgetExceeded:
                raise QueryRefused("budget_exhausted") from None
        else:
            remaining = max(dp.budget_per_period - ledger.spent(ctx.instance, ctx.session.user, period), 0.0)
        protected, stats, companions, kinds, narrowed_any = {}, [], {}, {}, False
        share = eps / max(len(plan.boundaries), 1)
        for bp, clamp in zip(plan.boundaries, clamps):
            person_unique, bounding, params = self._bounds(ctx, bp, clamp, share)
            if person_unique:
                # no per-person bounding: the SQL is a function of the plan alone (no
                # salt), so it is written once per plan and run as the user's prepared
                # statement, as in threshold mode
                cells = fetch(ctx.snap, self._cells_sql(bp, bounding), prepared_for=ctx.session.user,
                              deadline=ctx.deadline)
            else:   # bounding draws a fresh salt for every query
                cells = fetch(ctx.snap, cells_sql(bp, person_unique=False, bounding=bounding, dominance=False,
                                                  cell_keys=False),
                              deadline=ctx.deadline)
            domains, narrowed = _answered_domains(ctx, bp, bp)
            narrowed_any |= narrowed
            frame, st = protect_dp(cells, bp.aggregates, domains, params, clamp)
            protected[bp.name] = to_arrow(frame, bp, ctx.snap)
            companions[bp.name] = _status_table(frame, bp, protected[bp.name].num_rows)
            kinds[bp.name] = accuracy_kinds(self.name, bp)
            stats.append(st)
        table, cells, accuracy = post_process(ctx, protected, companions, kinds)
        return Released(table=table, stats=stats, defined=[None] * len(stats), epsilon_spent=spent,
                        epsilon_remaining=remaining, cells=cells, accuracy=accuracy, narrowed=narrowed_any)

    @staticmethod
    def _cells_sql(bp: BoundaryPlan, bounding: Bounding) -> str:
        """The cells SQL of a boundary whose rows are one per contributor."""
        return _memo_on_plan(bp, "_dp_cells_sql", tuple(sorted(bounding.clamp.items())),
                             lambda: cells_sql(bp, person_unique=True, bounding=bounding, dominance=False,
                                               cell_keys=False))

    @staticmethod
    def _bounds(ctx: Context, bp: BoundaryPlan, clamp: dict, share: float) -> tuple[bool, Bounding, DPParams]:
        """Contribution bounds of one boundary, from the policy and the query alone, and
        the cells SQL that enforces them: (rows already one per contributor in the store,
        bounding, parameters of the noise)."""
        dp = ctx.policy.disclosure.dp
        fast = one_row_per_contributor(bp, ctx.snap, ctx.catalog)
        if bp.unit:
            return fast, Bounding(max_groups=1, max_rows=1, clamp={}), DPParams(
                epsilon=share, delta=dp.delta, max_rows=UNIT_DP_SENSITIVITY, max_groups=UNIT_DP_SENSITIVITY,
                rows_are_contributors=True)
        identity = declared_row_identity(ctx.policy, bp)
        if identity is not None:
            # one row and one group per person by declaration; the cells SQL bounds each
            # person to one row unless the store's rows are already one per identity
            if len(identity) == 1:
                unique = fast
            else:
                unique = unique_in_store(ctx.snap, bp.personal_view, identity, ctx.deadline)
            return unique, Bounding(max_groups=1, max_rows=1, clamp=clamp), DPParams(
                epsilon=share, delta=dp.delta, max_rows=1, max_groups=1, rows_are_contributors=True)
        groups = groups_per_person(ctx.catalog.views[bp.personal_view].row_identities, bp)
        if groups is not None and groups < min(dp.max_groups_per_person, dp.max_rows_per_person):
            # one row per group by declaration, in at most ``groups`` groups (cells SQL enforces both)
            return fast, Bounding(max_groups=groups, max_rows=groups, clamp=clamp), DPParams(
                epsilon=share, delta=dp.delta, max_rows=groups, max_groups=groups)
        return fast, Bounding(max_groups=dp.max_groups_per_person, max_rows=dp.max_rows_per_person,
                              clamp=clamp), DPParams(epsilon=share, delta=dp.delta, max_rows=dp.max_rows_per_person,
                                                     max_groups=dp.max_groups_per_person)

    @staticmethod
    def _clamps(bp: BoundaryPlan, ctx: Context) -> dict[int, tuple[float, float]]:
        """Clamping bounds per SUM/AVG from the policy (never from data)."""
        if bp.unit:
            one_row_per_contributor(bp, ctx.snap, ctx.catalog)   # refuses a view that is not person-unique
        if getattr(bp, "household", False):
            # person rows with household facts: one person changes every member's row (joins)
            raise QueryRefused("dp_household_linkage", part=bp.personal_view)
        clamp = {}
        for j, agg in enumerate(bp.aggregates):
            if agg.kind in ("sum", "avg"):
                if agg.bounds is None or agg.cls not in ("measure", "sensitive_measure"):
                    raise QueryRefused("dp_derived_measure", part=agg.node.sql("duckdb") if agg.node else "")
                clamp[j] = agg.bounds
        return clamp

    def notes(self, policy: Policy, plan: Plan, released: Released) -> list[str]:
        notes = [f"差分プライバシーのノイズを加えています（ε = {released.epsilon_spent:g}）。",
                 "件数は偏りのない推定値とするため、ノイズを加えた値をそのまま示します（0未満の値もあります）。"]
        if any(not s.densified for s in released.stats) and any(bp.group_keys for bp in plan.boundaries):
            notes.append("公開された値域のない区分は、ノイズを加えた人数がしきい値以上のものだけを示します。"
                         "しきい値に届かない区分は表示していません（少人数の区分があること自体を隠すため。"
                         "表示しない区分の数もお知らせしません）。表示されない区分があってもなくても、"
                         "この照会の ε は同じだけ使われます。")
        if released.narrowed:
            notes.append("区分の値は、照会の条件で選ばれ得るものだけを示しています。")
        notes.append("各値の 95% 区間はノイズの大きさから計算したもので、真の値（上限・下限で切り詰めた値）を"
                     "約 95% の確率で含みます。")
        return notes

    def perturbation(self, policy: Policy) -> dict | None:
        return {"method": "dp", "count": "discrete-laplace", "sum": "discrete-laplace-fixed-point",
                "selection": "discrete-laplace-threshold"}


PROTECTIONS: dict[str, Protection] = {p.name: p for p in (ThresholdProtection(), DPProtection())}


def summary(policy: Policy, mode: str, plan: Plan, released: Released) -> dict:
    """The answer's summary: counts of cells and suppressions, the method, ε, notes."""
    protection = PROTECTIONS[mode]
    if plan.public_only:
        notes = ["公開情報のみの集計です（保護処理は不要）。"]
    else:
        notes = protection.notes(policy, plan, released)
    stats = released.stats
    return {
        "accuracy": None if plan.public_only else accuracy_summary(policy, mode, released),
        "mode": mode,
        "cells": int(sum(s.cells for s in stats)),
        "rows": released.table.num_rows,
        "cells_suppressed": int(sum(s.cells_suppressed for s in stats)),
        "values_suppressed_dominance": int(sum(s.values_suppressed_dominance for s in stats)),
        "perturbation": None if plan.public_only else protection.perturbation(policy),
        "epsilon_spent": released.epsilon_spent,
        "epsilon_remaining": released.epsilon_remaining,
        "query_id": None,
        "conditions_left_out": list(released.left_out),
        "cell_influence_checked": released.cells_checked,
        "conditions_left_out_as": [{"condition": c, "as": t} for c, t in zip(released.left_out, released.treated_as)],
        "notes_ja": notes,
    }


def accuracy_summary(policy: Policy, mode: str, released: Released) -> dict:
    """What the per-cell accuracy means, for the reader (``protect.status``): the kind per
    answer column and the public parameters behind it."""
    out: dict = {"columns": dict(released.accuracy), "cells": released.cells is not None}
    if mode == "dp":
        out["confidence"] = cell_status.CONFIDENCE
        return out
    p, d = policy.disclosure.perturbation, policy.disclosure.dominance
    out["count_max_noise"] = p.max_noise if p.enabled else 0
    if p.enabled:
        out["sum_relative"] = {"sensitive": cell_status.sum_relative_bound(SUM_NOISE_FRACTION, d.nk_k),
                               "other": cell_status.sum_relative_bound(SUM_NOISE_FRACTION, 1.0)}
    return out
