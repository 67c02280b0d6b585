"""Status and accuracy carried through post-processing to the answer's rows (issue 19).

Each protected table ``__b<i>`` has, next to every protected value ``__v<j>``, its
status ``__st<j>`` and interval ``__lo<j>``/``__hi<j>`` (``protect.status``).
Post-processing is the analyst's SQL above the boundaries; ``carry`` rewrites a copy of
it so that every output column that is a protected value (through any chain of plain
projections, filters, orders, limits and joins) brings its companions along as extra
hidden columns ``__cell<k>_st``/``_lo``/``_hi``:

* a bare column reference carries its source's companions unchanged;
* an expression of protected values (``n1 + n2``, ``n / total``) carries a status — the
  first input that is not ``released`` (a value computed from a suppressed cell is
  NULL and said to be suppressed) — and no interval (the guard does not propagate
  accuracy through arithmetic);
* ``SUM``, ``AVG``, ``MIN`` and ``MAX`` of protected values, with or without GROUP BY
  above the boundaries (``SELECT block, SUM(n) FROM (<per 町丁目 counts>) GROUP BY
  block``), carry the status of their inputs: ``released`` when every input row of the
  group was released, the inputs' status when none was (the aggregate is NULL), and
  ``partial`` when some were suppressed — the value is then computed without them, which
  the reader must be told. No interval (as for arithmetic);
* other aggregates, DISTINCT, HAVING, window functions, set operations or CTEs above the
  boundaries are not followed: their columns get no status (``None``, shown as
  unknown), and nothing below them is changed.

The companions are functions of protected values and public parameters only, and the
analyst's SQL cannot name them (identifiers starting with ``__`` are refused), so
carrying them changes no answer: ``PostProcessor`` runs the carried SQL and the answer
is its non-companion columns; if the carried SQL fails to execute, the original is run
and the answer has no statuses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sqlglot import exp

from sekisho.guard import hidden
from sekisho.guard.protect.status import NO_INTERVAL, PARTIAL, RELEASED, high_column, low_column, status_column

PREFIX = "__cell"
DIALECT = "duckdb"


@dataclass(frozen=True)
class Companion:
    status: str
    low: str
    high: str
    kind: str            # accuracy kind of the value (``protect.status``)


@dataclass(frozen=True)
class Carried:
    sql: str
    columns: dict[str, Companion]     # output column name (lower case) -> its companions


def is_companion(name: str) -> bool:
    return name.startswith(PREFIX)


def _sources(select: exp.Select) -> list[exp.Expression]:
    from_ = select.args.get("from_")
    out = [from_.this] if from_ is not None else []
    out += [j.this for j in select.args.get("joins") or []]
    return out


_UNSUPPORTED = ("distinct", "having", "qualify", "windows", "with_", "pivots", "laterals")
FOLLOWED_AGGREGATES = (exp.Sum, exp.Avg, exp.Min, exp.Max)


class _Carrier:
    def __init__(self, kinds: dict[str, list[str]]):
        self.kinds = kinds                       # boundary table -> accuracy kind per aggregate
        self.names = itertools.count()

    def select(self, select: exp.Select) -> dict[str, Companion] | None:
        if any(select.args.get(a) for a in _UNSUPPORTED):
            return None
        for p in select.expressions:
            if p.find(exp.Window, exp.Select, exp.Subquery):
                return None
        grouped = bool(select.args.get("group")) or any(p.find(exp.AggFunc) for p in select.expressions)
        sources: dict[str, dict[str, Companion] | None] = {}
        for src in _sources(select):
            alias = (src.alias_or_name or "").lower()
            if isinstance(src, exp.Table):
                kinds = self.kinds.get(src.name)
                sources[alias] = {} if kinds is None else {
                    hidden.protected_value(j): Companion(status_column(j), low_column(j), high_column(j), kind)
                    for j, kind in enumerate(kinds)}
            elif isinstance(src, exp.Subquery) and isinstance(src.this, exp.Select):
                sources[alias] = self.select(src.this)
            else:
                sources[alias] = None
        added: list[exp.Expression] = []
        out: dict[str, Companion] = {}
        for p in select.expressions:
            star = p if isinstance(p, exp.Star) else p.this if isinstance(p, exp.Column) and \
                isinstance(p.this, exp.Star) else None
            if star is not None:
                table = p.table.lower() if isinstance(p, exp.Column) and p.table else None
                for alias, companions in sources.items():
                    if companions and (table is None or alias == table):
                        out.update(companions)   # the companion columns are in the star too
                continue
            refs, unknown = [], False
            for col in p.find_all(exp.Column):
                found = self._resolve(col, sources)
                if found is None:
                    unknown = unknown or self._maybe_protected(col, sources)
                else:
                    refs.append((col, found))
            if unknown or not refs:
                continue
            base = f"{PREFIX}{next(self.names)}"
            inner = p.this if isinstance(p, exp.Alias) else p
            if grouped:
                # only an aggregate of protected values is followed through a GROUP BY
                if not isinstance(inner, FOLLOWED_AGGREGATES) or any(
                        isinstance(n, exp.AggFunc) for n in inner.this.walk()):
                    continue
                status = _aggregated_status(_row_status(refs))
                low = high = exp.cast(exp.Null(), "DOUBLE")
                kind = NO_INTERVAL
            elif isinstance(inner, exp.Column) and len(refs) == 1:
                col, comp = refs[0]
                status, low, high = (exp.column(c, table=col.table or None, quoted=True)
                                     for c in (comp.status, comp.low, comp.high))
                kind = comp.kind
            else:
                status = _row_status(refs)
                low = high = exp.cast(exp.Null(), "DOUBLE")
                kind = NO_INTERVAL
            added += [exp.alias_(status, f"{base}_st", quoted=True), exp.alias_(low, f"{base}_lo", quoted=True),
                      exp.alias_(high.copy(), f"{base}_hi", quoted=True)]
            out[p.alias_or_name.lower()] = Companion(f"{base}_st", f"{base}_lo", f"{base}_hi", kind)
        if added:
            select.select(*added, copy=False)
        return out

    @staticmethod
    def _resolve(col: exp.Column, sources: dict) -> Companion | None:
        name = col.name.lower()
        if col.table:
            companions = sources.get(col.table.lower())
            return companions.get(name) if companions else None
        hits = [c[name] for c in sources.values() if c and name in c]
        return hits[0] if len(hits) == 1 else None

    @staticmethod
    def _maybe_protected(col: exp.Column, sources: dict) -> bool:
        """A column read from a source that is not followed could be a protected value."""
        if col.table:
            return sources.get(col.table.lower(), None) is None
        return any(c is None for c in sources.values())


def _row_status(refs: list[tuple[exp.Column, Companion]]) -> exp.Expression:
    """The status of an expression of protected values: the first input not released."""
    return exp.func("COALESCE", *[exp.func("NULLIF", exp.column(c.status, table=col.table or None, quoted=True),
                                           exp.Literal.string(RELEASED)) for col, c in refs],
                    exp.Literal.string(RELEASED))


def _aggregated_status(row_status: exp.Expression) -> exp.Expression:
    """Over a group: released when every input was, the inputs' (suppressed) status when
    none was, ``partial`` when some were."""
    released = exp.EQ(this=row_status, expression=exp.Literal.string(RELEASED))
    return exp.Case(ifs=[exp.If(this=exp.func("BOOL_AND", released.copy()), true=exp.Literal.string(RELEASED)),
                         exp.If(this=exp.Not(this=exp.func("BOOL_OR", released.copy())),
                                true=exp.func("MIN", row_status.copy()))],
                    default=exp.Literal.string(PARTIAL))


def carry(post_sql: str, kinds: dict[str, list[str]]) -> Carried | None:
    """The post-processing SQL with companions carried to the output, or None when its
    top level is not a plain SELECT the rule follows."""
    try:
        from sqlglot import parse_one

        tree = parse_one(post_sql, read=DIALECT)
    except Exception:
        return None
    if not isinstance(tree, exp.Select):
        return None
    columns = _Carrier(kinds).select(tree)
    if not columns:
        return None
    return Carried(sql=tree.sql(dialect=DIALECT), columns=columns)
