"""Cells a neighbour cannot change, found by evaluating the query's group keys on the
public domains of the columns they read — never on the data.

A neighbour replaces one condition of the row SELECT (``cell_widening``). On a row where
that condition has the same value as its replacement, the whole row SELECT evaluates
alike, so the row stays in the cell it was in. Only rows where the two differ can move,
and each leaves or enters the cells its group keys give it before and after. When the
condition and a group key read only columns with a public domain (checked on every
upload; NULL added) or declared bands of such columns (``age_band`` of ``age``:
``policy.views.band_dependencies``), those keys are evaluated on every point of that small
grid: a cell whose value of that key is none of them cannot be changed by the neighbour,
whatever the data. ``CASE WHEN age >= 85 THEN '85+' ELSE age_band END`` (e-Stat's 85+ top
band) made FALSE moves only people of 85 and over, into 85-89 .. 100+: the bands below are
untouched, so they are answered as asked and not marked ``widened``.

The grid is evaluated by the engine that answers the query (same types, same semantics),
one statement per group key; a statement that fails, a column without a domain, a grid of
more than ``MAX_GRID`` points, or a key or condition with a subquery, window, aggregate
or random function leaves the neighbour as it was (no cell excluded).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.neighbours import Variant, apply
from sekisho.guard.sqltext import DIALECT
from sekisho.policy.views import band_label

MAX_GRID = 4096   # points of one key's grid (a domain of 101 ages with 13 blocks: 1,428)
OPAQUE = (exp.Subquery, exp.Select, exp.Window, exp.AggFunc, exp.Rand, exp.Anonymous, exp.Placeholder)


def untouched(base: exp.Expression, neighbours: list[Variant], kept, catalog, fetch: Callable) -> dict:
    """Per kept neighbour: a test of a cell's key telling that the neighbour cannot change
    that cell whatever the data (see the module docstring); neighbours it cannot decide
    are absent."""
    if catalog is None or not isinstance(base, exp.Select) or any(
            base.args.get(a) for a in ("group", "distinct", "having", "qualify")):
        return {}   # rows of the row SELECT are not the table's rows one by one
    keys = _group_keys(base)
    tables = _tables(base)
    if not keys or not tables:
        return {}
    nodes = list(base.walk())
    asks: dict[int, list[tuple[int, exp.Expression, exp.Expression, exp.Expression, exp.Expression]]] = {}
    for i in sorted(kept):
        v = neighbours[i]
        node = nodes[v.index] if 0 <= v.index < len(nodes) else None
        if node is None or not _plain(node, base):
            continue
        variant = apply(base, [v])
        new = list(variant.walk())[v.index]
        variant_keys = _group_keys(variant)
        atom_columns = _columns(node)
        for j, key in keys.items():
            inside = any(n is node for n in key.walk())
            if not inside and not (_closure(atom_columns, tables, catalog) & _closure(_columns(key), tables, catalog)):
                continue   # the key reads nothing the condition reads: every value may move
            if j not in variant_keys or any(isinstance(n, OPAQUE) for n in key.walk()):
                continue
            asks.setdefault(j, []).append((i, key, variant_keys[j], node, new))
    tests: dict[int, dict[int, frozenset]] = {}
    for j, items in asks.items():
        columns = set()
        for _, key, _, node, _ in items:
            columns |= _columns(key) | _columns(node)
        grid = _grid(sorted(columns), tables, catalog)
        if grid is None:
            continue
        parts = [f"SELECT {i} AS __i, b, v FROM (SELECT DISTINCT {_sql(k)} AS b, {_sql(vk)} AS v FROM __grid "
                 f"WHERE ({_sql(node)}) IS DISTINCT FROM ({_sql(new)}))"
                 for i, k, vk, node, new in items]
        try:
            got = fetch(f"WITH __grid AS ({grid}) {' UNION ALL '.join(parts)}")
        except Exception:   # noqa: BLE001 — undecided: nothing excluded (the cell keeps its neighbour)
            continue
        which = _values(got["__i"])
        touched: dict[int, set] = {i: set() for i, *_ in items}
        for i, b, v in zip(which, _values(got["b"]), _values(got["v"])):
            touched[int(i)] |= {b, v}
        for i, values in touched.items():
            tests.setdefault(i, {})[j] = frozenset(values)
    return {i: (lambda key, by_key=by_key: any(key[j] not in values for j, values in by_key.items()))
            for i, by_key in tests.items()}


def _group_keys(select: exp.Select) -> dict[int, exp.Expression]:
    out = {}
    for p in select.expressions:
        if isinstance(p, exp.Alias) and p.alias.startswith(hidden.GROUP_KEY_PREFIX):
            out[int(p.alias[len(hidden.GROUP_KEY_PREFIX):])] = p.this
    return out


def _tables(select: exp.Select) -> dict[str, str]:
    """The row SELECT's own tables: alias -> view (subqueries and repeated aliases left out)."""
    sources = [select.args.get("from_")] + list(select.args.get("joins") or [])
    out: dict[str, str] = {}
    seen: set[str] = set()
    for s in sources:
        t = s.this if s is not None else None
        if isinstance(t, exp.Table):
            alias = t.alias_or_name
            if alias in seen:
                out.pop(alias, None)
            else:
                out[alias] = t.name
            seen.add(alias)
    return out


def _plain(node: exp.Expression, base: exp.Select) -> bool:
    """Whether the condition is evaluated per row of the row SELECT itself: not inside a
    subquery, window or aggregate, and reading none."""
    if not isinstance(node, exp.Condition) or any(isinstance(n, OPAQUE) for n in node.walk()):
        return False   # (a join's existence is an atom too: not a value of the row)
    parent = node.parent
    while parent is not None and parent is not base:
        if isinstance(parent, OPAQUE):
            return False
        parent = parent.parent
    return parent is base


def _columns(tree: exp.Expression) -> set[tuple[str, str]]:
    return {(c.table, c.name) for c in tree.find_all(exp.Column)}


def _closure(columns: set[tuple[str, str]], tables: dict[str, str], catalog) -> set[tuple[str, str]]:
    """The columns and the columns they are bands of (age_band reads age)."""
    out = set(columns)
    for t, c in columns:
        info = _info(t, c, tables, catalog)
        if info is not None and info.band_of is not None:
            out.add((t, info.band_of[0]))
    return out


def _info(table: str, column: str, tables: dict[str, str], catalog):
    view = catalog.views.get(tables.get(table, ""))
    return view.columns.get(column) if view is not None else None


def _grid(columns: list[tuple[str, str]], tables: dict[str, str], catalog) -> str | None:
    """Every combination of the columns' domain values (and NULL) as one SELECT, bands
    computed from the column they band; None when a column has no domain or the grid is
    too large."""
    infos = {tc: _info(*tc, tables, catalog) for tc in columns}
    if any(info is None for info in infos.values()):
        return None
    derived = {tc: (tc[0], info.band_of[0]) for tc, info in infos.items()
               if info.band_of is not None and (tc[0], info.band_of[0]) in infos}
    free = [tc for tc in columns if tc not in derived]
    if any(infos[tc].domain is None for tc in free):
        return None
    if any(not all(isinstance(x, int) and not isinstance(x, bool) for x in infos[of].domain)
           for of in derived.values()):
        return None   # a band of something other than integers: not the policy's bands
    size = 1
    for tc in free:
        size *= len(infos[tc].domain) + 1
        if size > MAX_GRID:
            return None
    rows = []
    for point in itertools.product(*[list(infos[tc].domain) + [None] for tc in free]):
        values = dict(zip(free, point))
        for tc, of in derived.items():
            _, width, top = infos[tc].band_of
            values[tc] = band_label(values[of], width, top)
        rows.append("(" + ", ".join(_literal(values[tc], infos[tc].sql_type) for tc in columns) + ")")
    names = ", ".join(_name(tc) for tc in columns)
    return f"SELECT * FROM (VALUES {', '.join(rows)}) AS __g({names})"


def _literal(value, sql_type: str) -> str:
    return f"CAST({exp.convert(value).sql(dialect=DIALECT)} AS {sql_type})"


def _name(tc: tuple[str, str]) -> str:
    return exp.to_identifier(f"{tc[0]}.{tc[1]}", quoted=True).sql(dialect=DIALECT)


def _sql(tree: exp.Expression) -> str:
    """The expression reading the grid's columns (``"table.column"``) instead of the table's."""
    def rename(node):
        if isinstance(node, exp.Column):
            return exp.Column(this=exp.to_identifier(f"{node.table}.{node.name}", quoted=True))
        return node
    return tree.copy().transform(rename).sql(dialect=DIALECT)


def _values(column) -> list:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column.tolist())
