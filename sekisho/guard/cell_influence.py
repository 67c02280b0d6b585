"""Condition influence per cell (threshold mode): the contributors each neighbouring
query changes in each cell.

Why: ``influence.decide`` counts, for each neighbour (an atom replaced by TRUE or FALSE,
an IN element or a BETWEEN bound dropped), the contributors it changes over the whole
query. A condition can change many persons city-wide and one person in one cell:

    SELECT CASE WHEN age = 40 THEN chome_code ELSE '2820140012' END AS g, COUNT(*) AS a,
           COUNT(*) FILTER (WHERE age <> 40 OR sex = '男') AS b FROM residents GROUP BY 1

Every atom moves dozens of 40-year-olds, so the query rule keeps them all; in the cell of
the target's 町丁目 ``a`` and ``b`` have the same contributors exactly when the target is a
man, and consistent noise answers equal sets equally. The same pair is two boundaries of
one query, or two queries. Counted per cell, some neighbour changes that cell by one
person in either case (``age <> 40`` made TRUE adds her, ``sex = '男'`` made FALSE removes
him), so the cell is answered alike whatever the target is.

What is counted: for the query as answered (after ``decide``) and each of its neighbours,
per cell of the query's group keys, the contributors whose rows in that cell differ —
included or not, other values — counted in the cell they leave and in the cell they
arrive in (a neighbour that changes a group key moves rows between cells), with their
cell key. What is done with the counts is ``cell_widening``'s: each cell is answered with
the neighbours that change it by fewer than k applied (suppressing it instead would tell
a cell changed by one person from one changed by none).

Cost: one more scan per grouped threshold query with conditions — over one table, one
aggregate grouped by cell with a FILTER per neighbour (the neighbours that move rows
between cells add one grouping each); other shapes compare each neighbour's rows with
the query's, as ``neighbour_counts`` does for the whole query.

Residual risk: a condition built so that no single replacement touches the target's cell
(each atom doubled in a way that still changes k or more persons elsewhere) is not seen
here; pairs of queries differing by a constant (``age >= 40`` / ``>= 41``) are not
neighbours. Both are the differencing alerts' and DP mode's.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.hidden import PID, RKEY
from sekisho.guard.neighbour_counts import (_flat, _flat_worlds, _local, _parts, _q, _simple, atom_patterns,
                                           changed_conditions, pattern_columns, pattern_counts, unit_parts,
                                           unit_scope_shape)
from sekisho.guard.neighbour_units import _changed as changed_units
from sekisho.guard.neighbour_units import _included as included_units
from sekisho.guard.neighbour_units import unit_worlds
from sekisho.guard.neighbours import Variant, apply, variant_sql, variant_tree
from sekisho.guard.protect.cellkey import cell_key_sql
from sekisho.guard.sqltext import DIALECT
from sekisho.guard.unit_levels import _Levels, fold

WHICH = "__w"   # the neighbour a row of the counts belongs to


def selects_nothing(tree: exp.Expression) -> bool:
    """Whether a row SELECT selects no row whatever the data: its WHERE is FALSE, an INNER
    or SEMI join's ON is FALSE, or what it selects from selects nothing. Decided from the text (what is missed here is only
    checked per cell as well, never let through)."""
    if isinstance(tree, exp.Subquery):
        return selects_nothing(tree.this)
    if not isinstance(tree, exp.Select):
        return False
    source = tree.args.get("from_")
    if source is not None and selects_nothing(source.this):
        return True
    where = tree.args.get("where")
    if where is not None:
        folded = fold(where.this)
        if isinstance(folded, exp.Boolean) and not folded.this:
            return True
    for join in tree.args.get("joins") or []:
        on = join.args.get("on")
        on = fold(on) if on is not None else None
        inner = (join.side or "").upper() in ("", "INNER") and (join.kind or "").upper() != "ANTI"
        if inner and ((isinstance(on, exp.Boolean) and not on.this) or selects_nothing(join.this)):
            return True
    return False


def cell_influence_sql(row: exp.Expression, neighbours: list[Variant], columns: list[str], *,
                       person_unique: bool, keep: list[int] | None = None) -> str | None:
    """Rows (``__w`` neighbour, the group keys ``__g*``, ``__n`` contributors changed in
    that cell, ``__ck`` their cell key); a neighbour and cell may come in two rows (leaving
    and arriving), to be added. ``row`` is the tree ``neighbourhood`` returned; ``keep``:
    ``counted_neighbours``, when the caller has it."""
    groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
    # a neighbour that selects no row at all (a top-level condition made FALSE, a join
    # denied) empties every cell: a cell against nothing is its own count, no near pair
    keep = counted_neighbours(row, neighbours) if keep is None else keep
    if not keep:
        return None
    if _simple(row):
        worlds, source, atoms, alias = _flat_worlds(row, list(row.walk()), neighbours)
        return _flat_sql(worlds, source, columns, groups, person_unique, keep, (atoms, alias))
    base = _flat(row)
    if base is not None:
        flats = [_flat(variant_tree(row, v)) for v in neighbours]
        source = base.args["from_"].sql(dialect=DIALECT)
        if all(f is not None and f.args["from_"].sql(dialect=DIALECT) == source for f in flats):
            return _flat_sql([_parts(base)] + [_parts(f) for f in flats], source, columns, groups, person_unique, keep)
    if unit_scope_shape(row) is not None:
        shape, nodes, part_of = unit_parts(row)
        rows = unit_rows(row, shape, nodes, neighbours, columns, lambda v: _local(v, nodes, part_of), keep)
        if rows is not None:
            return _units_sql(rows, groups)
    return general_sql(row.sql(dialect=DIALECT), {i: variant_sql(row, neighbours[i]) for i in keep}, columns, groups)


def query_and_cell_sql(row: exp.Expression, neighbours: list[Variant], columns: list[str],
                       kept: Callable[[], list[int]]) -> str | None:
    """For a grouped query over one table of one row per contributor whose neighbours move
    no row between cells: one grouped scan with, per cell, each counted neighbour's changed
    contributors and (``__w`` = ``len(neighbours)``) the query's own — the query-wide
    counts are their sums (a row is in one cell in every world), so ``influence.decide``'s
    first round and the per-cell counts share a scan. None for any other shape. ``kept``:
    the counted neighbours (``counted_neighbours``), asked only for a shape that fits."""
    groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
    if not groups or not _simple(row):
        return None
    keep = kept()
    worlds, source, atoms, alias = _flat_worlds(row, list(row.walk()), neighbours)
    cond0, proj0 = worlds[0]
    q_cell = [proj0[g] for g in groups]
    if any([worlds[i + 1][1][g] for g in groups] != q_cell for i in keep):
        return None
    changed = changed_conditions(worlds, columns)
    flags = [changed[i] for i in keep] + [f"COALESCE(({cond0}), FALSE)"]
    return _grouped(keep + [len(neighbours)], q_cell, flags, source, groups, proj0[PID], proj0[RKEY], True,
                    (atoms, alias))


def units_and_cells_sql(row: exp.Expression, neighbours: list[Variant], columns: list[str],
                        keep: list[int]) -> str | None:
    """For a query over a unit scope: ``cell_influence_sql``'s rows and, as ``__w`` =
    ``len(neighbours)``, the query's own cells — per cell its units and their cell key,
    as ``cells.cells_sql`` counts one row per unit — from the one GROUP BY of the view the
    statement materializes (``LEVEL1``). So ``influence.decide``'s last round gives the
    cells of a query that counts units only, and the cells scan, a second GROUP BY of the
    view (1.6 s of reports/06's 家族類型 query at 530k), is not run. None for any other
    shape."""
    groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
    if not groups or not keep or _simple(row) or _flat(row) is not None or unit_scope_shape(row) is None:
        return None
    shape, nodes, part_of = unit_parts(row)
    rows = unit_rows(row, shape, nodes, neighbours, columns, lambda v: _local(v, nodes, part_of), keep)
    return None if rows is None else _units_sql(rows, groups, own=len(neighbours))


def unit_rows(row: exp.Select, shape, nodes: list[exp.Expression], neighbours: list[Variant], columns: list[str],
              locate, keep: list[int]):
    """One row per unit with, for the query and each kept neighbour that has units, what
    ``cell_influence`` counts per cell: (the GROUP BY of the view, the source over it as
    ``LEVEL1``, the query's inclusion, its cell expressions, [(neighbour, its cell
    expressions, changed, its inclusion)], contributor, unit key) — every world's features
    computed over one GROUP BY. None when a neighbour is not a query over the same unit
    scope."""
    built = unit_worlds(row, shape, nodes, neighbours, columns, locate)
    if built is None:
        return None
    levels, level1, worlds, *_ = built
    wanted, rows = _unit_parts(worlds, columns, keep)
    return (level1, f"FROM {levels.over(LEVEL1, levels.closure(wanted))}", *rows)


def _unit_parts(worlds, columns: list[str], keep: list[int], shift: int = 0):
    """The unit columns the query's and the kept neighbours' worlds read, and ``unit_rows``'s
    rows without the source (neighbour ``i`` numbered ``shift + i``)."""
    groups = [c for c in columns if c.startswith("__g")]
    used = [0] + [i + 1 for i in keep if worlds[i + 1].present is not None]
    wanted = set()
    for i in used:
        wanted |= {worlds[i].present, *worlds[i].features.values()}
    w0 = worlds[0]
    others = [(shift + i - 1, [worlds[i].proj[g] for g in groups], changed_units(w0, worlds[i], columns),
               included_units(worlds[i])) for i in used[1:]]
    return wanted, (included_units(w0), [w0.proj[g] for g in groups], others, w0.proj[PID], w0.proj[RKEY])


def units_batch_sql(trees: list[tuple[exp.Expression, list[Variant], list[int]]],
                    columns: list[str]) -> tuple[str, list[int]] | None:
    """``cell_influence_sql`` of several row trees over one unit scope in one statement —
    a query's second tiers (``cell_widening.CellWorlds.second``): every tree's worlds
    computed over one GROUP BY of the view (shared unit columns, materialized once), each
    tree's counts read from it, tree t's neighbour i as ``__w`` = offsets[t] + i (the
    GROUP BY's aggregates are materialized, 100 MB at 530k for six of reports/06's tiers;
    the columns over them, most of them text, are computed per tree, not kept). Why: a
    tier's own statement grouped the view again (reports/06: six tiers a query, 0.2-1 s
    each at 530k). (SQL, offsets), or None when a tree is not over the unit scope of the
    first (then one statement each)."""
    groups = [c for c in columns if c.startswith(hidden.GROUP_KEY_PREFIX)]
    levels = _Levels()
    scope = None
    parts, offsets, offset = [], [], 0
    for row, neighbours, keep in trees:
        if _simple(row) or _flat(row) is not None or unit_scope_shape(row) is None:
            return None
        shape, nodes, part_of = unit_parts(row)
        table, key = shape[1].args["from_"].this, shape[1].args["group"].expressions[0]
        this = (table.sql(dialect=DIALECT), key.sql(dialect=DIALECT))
        if scope is not None and this != scope[0]:
            return None
        scope = scope or (this, table.copy(), key.copy())
        built = unit_worlds(row, shape, nodes, neighbours, columns,
                            lambda v, n=nodes, p=part_of: _local(v, n, p), levels)
        if built is None:
            return None
        parts.append(_unit_parts(built[2], columns, keep, shift=offset))
        offsets.append(offset)
        offset += len(neighbours)
    selects = [_unit_parts_sql((f"FROM {levels.over(LEVEL1, levels.closure(used))}", *rows), groups)
               for used, rows in parts if rows[2]]
    if scope is None or not selects:
        return None
    return f"WITH {LEVEL1} AS MATERIALIZED ({levels.level1(scope[1], scope[2])}) {' UNION ALL '.join(selects)}", \
        offsets


LEVEL1 = "__level1"   # the unit scope's GROUP BY of the view, materialized once per statement


def _units_sql(rows, groups: list[str], own: int | None = None) -> str:
    """Per cell over one row per unit (``neighbour_units.unit_rows``): as over one table
    of one row per contributor — the rows a neighbour changes counted in the query's cell
    when the query includes them, and in the neighbour's cell when they arrive there. The
    unit scope's GROUP BY is materialized (``LEVEL1``): read by both parts, it ran twice.
    ``own``: the ``__w`` of the query's own cells, counted too (``units_and_cells_sql``)."""
    level1, *rest = rows
    if not rest[3] and own is None:   # no neighbour has units
        return f"SELECT NULL::BIGINT AS {WHICH} WHERE FALSE"
    return f"WITH {LEVEL1} AS MATERIALIZED ({level1}) {_unit_parts_sql(rest, groups, own)}"


def _unit_parts_sql(rows, groups: list[str], own: int | None = None) -> str:
    source, in0, q_cell, others, pid, rkey = rows
    which = [i for i, *_ in others]
    main = [f"({changed}) AND ({in0})" for _, _, changed, _ in others]
    if own is not None:   # the units the query includes, each in its cell
        which.append(own)
        main.append(f"COALESCE(({in0}), FALSE)")
    parts = [_grouped(which, q_cell, main, source, groups, pid, rkey, True)]
    if others:
        parts.append(_arrivals([(i, cell, changed, included) for i, cell, changed, included in others], in0,
                               q_cell, source, groups, pid, rkey, True))
    return " UNION ALL ".join(parts)


def counted_neighbours(row: exp.Expression, neighbours: list[Variant]) -> list[int]:
    """The neighbours counted per cell: all but those that select nothing. Each is
    checked with its replacement put into ``row`` and taken out again (as
    ``neighbour_counts._flat_worlds`` renders them): ``row`` is the tree ``neighbourhood``
    made for this decision, not yet shared, and a copy per neighbour cost more than the
    check."""
    # (the tree is not kept on the variant: a variant with a tree of its own is written in
    # full by the one-scan counts instead of as one replaced atom, ``neighbour_counts._local``)
    nodes = list(row.walk())
    out = []
    for i, v in enumerate(neighbours):
        if v.tree is not None:
            nothing = selects_nothing(v.tree)
        elif v.replacement is None or not 0 <= v.index < len(nodes) or nodes[v.index] is row:
            nothing = selects_nothing(apply(row, [v]))
        else:
            node, new = nodes[v.index], v.replacement
            node.replace(new)
            try:
                nothing = selects_nothing(row)
            finally:
                new.replace(node)
        if not nothing:
            out.append(i)
    return out


# ---- one table -------------------------------------------------------------------------
def _flat_sql(worlds: list[tuple[str, dict[str, str]]], source: str, columns: list[str], groups: list[str],
              person_unique: bool, keep: list[int], atoms: tuple[list[str], str] = ([], "")) -> str:
    cond0, proj0 = worlds[0]
    changed = changed_conditions(worlds, columns)
    pid, rkey = proj0[PID], proj0[RKEY]
    q_cell = [proj0[g] for g in groups]
    # rows counted in the query's cell (the cell they leave, or stay in with other values)
    main = []
    arrivals = []
    for i in keep:
        (cond, proj), d = worlds[i + 1], changed[i]
        n_cell = [proj[g] for g in groups]
        if n_cell == q_cell:
            main.append(d)
            continue
        main.append(f"({d}) AND ({cond0})")
        # ... and in the neighbour's cell they arrive in
        arrivals.append((i, n_cell, d, cond))
    parts = [_grouped(keep, q_cell, main, source, groups, pid, rkey, person_unique, atoms)]
    if arrivals:
        parts.append(_arrivals(arrivals, cond0, q_cell, source, groups, pid, rkey, person_unique))
    return " UNION ALL ".join(parts)


def _arrivals(arrivals: list[tuple[int, list[str], str, str]], cond0: str, q_cell: list[str], source: str,
              groups: list[str], pid: str, rkey: str, person_unique: bool) -> str:
    """The rows each neighbour moves into another cell, per neighbour and that cell, in one
    scan: every cell expression computed once per row, each row listing the (neighbour,
    cell) it arrives in — included by the neighbour, and not already in that cell for the
    query — and only those entries grouped."""
    cols = [f"{pid} AS __p", f"{rkey} AS __r", f"COALESCE(({cond0}), FALSE) AS __in"] + \
        [f"{e} AS __q{j}" for j, e in enumerate(q_cell)]
    items = []
    for i, cell, cond in ((i, cell, cond) for i, cell, _, cond in arrivals):
        cols.append(f"COALESCE(({cond}), FALSE) AS __in{i}")
        cols += [f"{e} AS __n{i}_{j}" for j, e in enumerate(cell)]
        same = " AND ".join(f"(__q{j} IS NOT DISTINCT FROM __n{i}_{j})" for j in range(len(cell))) or "TRUE"
        fields = ", ".join([f"'w': {i}"] + [f"'{g}': __n{i}_{j}" for j, g in enumerate(groups)])
        items.append(f"CASE WHEN __in{i} AND NOT (__in AND {same}) THEN {{{fields}}} END")
    rows = f"SELECT {', '.join(cols)} {source}"
    entries = f"SELECT UNNEST(list_filter([{', '.join(items)}], x -> x IS NOT NULL)) AS __e, __p, __r FROM ({rows}) AS __rw"
    g_list = ", ".join(_q(g) for g in groups)
    cell_sel = ", ".join(f"__e.{_q(g)} AS {_q(g)}" for g in groups)
    flat = f"SELECT __e.w AS {WHICH}, {cell_sel}, __p, __r FROM ({entries}) AS __en"
    if person_unique:
        return (f"(SELECT {WHICH}, {g_list}, COUNT(*) AS {hidden.CONTRIBUTORS}, "
                f"{cell_key_sql('COALESCE(SUM(__r), 0)')} AS {hidden.CELL_KEY} FROM ({flat}) AS __f GROUP BY ALL)")
    per_person = (f"SELECT {WHICH}, {g_list}, __p, SUM(__r) AS __k FROM (SELECT DISTINCT * FROM ({flat}) AS __f) "
                  "AS __d GROUP BY ALL")
    return (f"(SELECT {WHICH}, {g_list}, COUNT(*) AS {hidden.CONTRIBUTORS}, "
            f"{cell_key_sql('COALESCE(SUM(__k), 0)')} AS {hidden.CELL_KEY} FROM ({per_person}) AS __pp GROUP BY ALL)")


def _grouped(which: list[int], cell: list[str], flags: list[str], source: str, groups: list[str], pid: str,
             rkey: str, person_unique: bool, atoms: tuple[list[str], str] = ([], "")) -> str:
    """Long rows (__w, cell, __n, __ck) for the neighbours ``which``, their rows marked by
    ``flags``, grouped by ``cell``; a person's key in a cell is the sum of their distinct
    record keys there (one row per person and record key first, as ``neighbour_counts``).
    ``atoms``: the atom columns of ``source`` and its alias (``_flat_worlds``); flags of
    atoms and of the cells' columns are counted over the rows' patterns (``atom_patterns``)."""
    cell_cols = [f"{c} AS {_q(g)}" for c, g in zip(cell, groups)]
    g_list = ", ".join(_q(g) for g in groups)
    g_sel = f"{g_list}, " if groups else ""
    atom_names, alias = atoms
    by = pattern_columns(flags, alias, cell) if person_unique and atom_names else None
    if by is not None:
        aggs = [a for i, f in zip(which, flags) for a in pattern_counts(f, str(i))]
        wide = (f"SELECT {g_sel}{', '.join(aggs)} FROM {atom_patterns(cell, atom_names, by, rkey, source, alias)}"
                + (f" GROUP BY {g_list}" if groups else ""))
    elif person_unique:
        aggs = []
        for i, f in zip(which, flags):
            aggs += [f"COUNT(*) FILTER (WHERE {f}) AS __n{i}",
                     f"{cell_key_sql(f'COALESCE(SUM({rkey}) FILTER (WHERE {f}), 0)')} AS __ck{i}"]
        wide = (f"SELECT {', '.join(cell_cols + aggs)} {source}" + (f" GROUP BY {', '.join(cell)}" if groups else ""))
    else:
        per_record = cell_cols + [f"{pid} AS __p", f"{rkey} AS __r"] + \
            [f"bool_or({f}) AS __d{i}" for i, f in zip(which, flags)]
        per_person = [f"bool_or(__d{i}) AS __d{i}" for i in which] + \
            [f"SUM(__r) FILTER (WHERE __d{i}) AS __k{i}" for i in which]
        per_cell = []
        for i in which:
            per_cell += [f"COUNT(*) FILTER (WHERE __d{i}) AS __n{i}",
                         f"{cell_key_sql(f'COALESCE(SUM(__k{i}), 0)')} AS __ck{i}"]
        by_record = f"{g_sel}__p, __r"
        by_person = f"{g_sel}__p"
        wide = (f"SELECT {g_sel}{', '.join(per_cell)} FROM (SELECT {by_person}, {', '.join(per_person)} FROM "
                f"(SELECT {', '.join(per_record)} {source} GROUP BY {by_record}) AS __pr GROUP BY {by_person}) "
                f"AS __pp" + (f" GROUP BY {g_list}" if groups else ""))
    longs = [f"SELECT {i} AS {WHICH}, {g_sel}__n{i} AS {hidden.CONTRIBUTORS}, __ck{i} AS {hidden.CELL_KEY} "
             f"FROM __wide WHERE __n{i} > 0" for i in which]
    # (materialized: one scan, read once per neighbour; inlined, each would scan again)
    return f"(WITH __wide AS MATERIALIZED ({wide}) {' UNION ALL '.join(longs)})" if longs else \
        f"(SELECT NULL::BIGINT AS {WHICH} WHERE FALSE)"


# ---- any other shape ---------------------------------------------------------------------
def general_sql(row_sql: str, neighbours: dict[int, str], columns: list[str], groups: list[str]) -> str:
    """Each neighbour's rows compared with the query's as multisets of (contributor,
    record key, cell, values); the rows in one and not the other, per cell they sit in."""
    cols = ", ".join([_q(PID), _q(RKEY), *(_q(c) for c in columns)])
    g_list = ", ".join(_q(g) for g in groups)
    g_sel = f"{g_list}, " if groups else ""

    def rows(sql: str) -> str:
        return f"SELECT {cols}, COUNT(*) AS __m FROM ({sql}) AS __r GROUP BY ALL"

    ctes = [f"__s AS ({rows(row_sql)})"]
    selects = []
    for i, neighbour_sql in neighbours.items():
        ctes.append(f"__s{i} AS ({rows(neighbour_sql)})")
        ctes.append(f"__x{i} AS (SELECT {g_sel}{_q(PID)}, SUM(DISTINCT {_q(RKEY)}) AS __k FROM "
                    f"((SELECT * FROM __s EXCEPT SELECT * FROM __s{i}) UNION ALL "
                    f"(SELECT * FROM __s{i} EXCEPT SELECT * FROM __s)) AS __x GROUP BY {g_sel}{_q(PID)})")
        selects.append(f"SELECT {i} AS {WHICH}, {g_sel}COUNT(*) AS {hidden.CONTRIBUTORS}, "
                       f"{cell_key_sql('COALESCE(SUM(__k), 0)')} AS {hidden.CELL_KEY} FROM __x{i}"
                       + (f" GROUP BY {g_list}" if groups else ""))
    return f"WITH {', '.join(ctes)} {' UNION ALL '.join(selects)}"
