"""The operands of a view column and the derivations (``derive:``), resolved and
type-checked: a released value (``name``, ``alias.name``), the exact value a rule keeps
inside the ingest, or a named derivation with its parameters.

Each derivation's checker (``_DERIVATION_CHECKS``) says what it computes and what it
gives (``Kind``: type, format, possible values), so a column's declared type, format and
domain can be checked against its origin; ``sekisho.ingest.derivations`` implements the
same names in SQL (a test keeps the two registries equal). Apart from the views section
because this is the vocabulary that grows when a dataset needs a new derivation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sekisho.policy.checker import Checker
from sekisho.policy.model import (Bands, DayOfYear, Derivation, ExactValue, Join, KeyValue, Origin, Source,
                                  Total, Value, rule_releases)
from sekisho.policy.vocabulary import DERIVATIONS, EXACT_VALUE_RULES


@dataclass(frozen=True)
class Scope:
    """What the definitions of one view (or total) may refer to: its source, the sources
    it joins, and the policy's band schemes and totals."""
    view: str
    source: Source
    joins: dict[str, Join]
    sources: dict[str, Source]
    bands: dict[str, Bands] = field(default_factory=dict)
    totals: dict[str, Total] = field(default_factory=dict)
    section: str = "views"

    def split(self, c: Checker, key: str, text: str) -> tuple[str | None, Source, str]:
        """``name`` (the view's source) or ``alias.name`` (a joined source)."""
        if "." not in text:
            return None, self.source, text
        alias, name = text.split(".", 1)
        if alias not in self.joins:
            known = ", ".join(self.joins) or "none"
            raise c.fail(key, f"no join named {alias!r} ({self.section}.{self.view}.joins declares: {known})")
        return alias, self.sources[self.joins[alias].source], name


@dataclass(frozen=True)
class Kind:
    """What an operand gives: its type, and its format and possible values when known;
    ``measure`` (source, column) when it is a value of a kept numeric source column or a
    total of one (what a band scheme may classify)."""
    type: str
    format: str | None = None
    domain: tuple | None = None
    measure: tuple[str, str] | None = None


def has_type(value: Any, type_: str) -> bool:
    if isinstance(value, bool):
        return type_ == "boolean"
    return {"string": isinstance(value, str), "integer": isinstance(value, int),
            "float": isinstance(value, (int, float))}.get(type_, False)


def released_value(c: Checker, key: str, node: Any, scope: Scope, implicit: bool = False) -> Value:
    """A released value named ``name`` or ``alias.name`` (``implicit``: the column's own
    name, taken because the column gives no ``from:``)."""
    text = c.string(node, key)
    join, source, name = scope.split(c, key, text)
    released = source.released
    if name in released:
        return Value(join=join, name=name, released=released[name])
    raw = source.columns.get(name)
    if raw is not None:
        gives = ", ".join(rule_releases(raw)) or "nothing"
        why = f"sources.{source.name}.columns.{name} has rule {raw.rule!r}, which releases {gives}"
    else:
        why = f"it releases {', '.join(released) or 'nothing'}"
    given = "without from:, the column's own name " if implicit else ""
    raise c.fail(key, f"{given}{text!r} is not a value the rules of source {source.name} release ({why})")


def exact_value(c: Checker, key: str, node: Any, scope: Scope, types: tuple[str, ...], what: str) -> ExactValue:
    """The exact value of the raw column ``column`` or ``alias.column``."""
    text = c.string(node, key)
    join, source, name = scope.split(c, key, text)
    col = source.columns.get(name)
    if col is None:
        raise c.fail(key, f"{text!r} is not a column of sources.{source.name}")
    if col.type not in types:
        raise c.fail(key, f"{what} must be a {' or '.join(types)} column; sources.{source.name}.columns."
                          f"{name} is {col.type}")
    if col.rule not in EXACT_VALUE_RULES:
        raise c.fail(key, f"rule {col.rule!r} of sources.{source.name}.columns.{name} does not keep the "
                          f"exact value for derivations (rules that do: {', '.join(EXACT_VALUE_RULES)})")
    return ExactValue(join=join, column=name, rule=col.rule, type=col.type)


def key_value(c: Checker, key: str, node: Any, scope: Scope) -> KeyValue:
    """A key of a total: the raw column ``column`` or ``alias.column``, kept (a code, text
    or integer) or a keyed identifier (matched on its namespace inside the ingest)."""
    text = c.string(node, key)
    join, source, name = scope.split(c, key, text)
    col = source.columns.get(name)
    if col is None:
        raise c.fail(key, f"{text!r} is not a column of sources.{source.name}")
    if col.rule == "keyed_id":
        return KeyValue(join=join, column=name, type=col.type, namespace=col.params["namespace"],
                        keyed_as=col.params["as"])
    if col.rule != "keep" or col.type not in ("code", "text", "integer"):
        raise c.fail(key, f"a key is a kept code, text or integer (rule keep) or a keyed identifier "
                          f"(rule keyed_id); sources.{source.name}.columns.{name} is a {col.type} with "
                          f"rule {col.rule!r}")
    return KeyValue(join=join, column=name, type=col.type)


def key_kind(value: KeyValue) -> str:
    """What a key matches: identifiers of one namespace, or integers, or strings."""
    if value.namespace is not None:
        return f"keyed identifiers of namespace {value.namespace}"
    return "integer" if value.type == "integer" else "string"


def _source_of_join(scope: Scope, join: str | None) -> Source:
    return scope.source if join is None else scope.sources[scope.joins[join].source]


def _operand(c: Checker, key: str, node: Any, scope: Scope) -> tuple[Origin, Kind]:
    """A released value (``name``, ``alias.name``) or a nested derivation (a mapping)."""
    if isinstance(node, dict):
        return derivation(c, key, node, scope)
    value = released_value(c, key, node, scope)
    r = value.released
    measure = None
    if r.rule == "keep" and r.type in ("integer", "float"):
        measure = (_source_of_join(scope, value.join).name, r.column)
    return value, Kind(r.type, r.format, r.domain, measure)


def derivation(c: Checker, key: str, spec: dict, scope: Scope,
                extra: set[str] = frozenset()) -> tuple[Derivation, Kind]:
    """``derive: NAME`` and its parameters (``extra``: the column keys beside them)."""
    spec = c.mapping(spec, key)
    name = spec.get("derive")
    if name not in DERIVATIONS:
        raise c.fail(f"{key}.derive", f"unknown derivation {name!r} (known: {', '.join(DERIVATIONS)})")
    params = DERIVATIONS[name]
    c.mapping(spec, key, allowed=set(extra) | {"derive"} | set(params))
    for pname, needed in params.items():
        if needed and pname not in spec:
            raise c.fail(f"{key}.{pname}", f"derivation {name!r} needs this parameter")
    resolved, kind = _DERIVATION_CHECKS[name](c, key, spec, scope)
    return Derivation(name=name, params=resolved), kind


def _month_of(c: Checker, key: str, node: Any, scope: Scope) -> Origin:
    op, kind = _operand(c, key, node, scope)
    if kind.format != "YYYY-MM":
        raise c.fail(key, f"needs a YYYY-MM month (released by year_month or birth_topcoded); {op} "
                          "is not one")
    return op


def _first_of(c, key, spec, scope):
    """The first of several values that is not empty (SQL coalesce)."""
    items = spec["of"]
    if not isinstance(items, list) or len(items) < 2:
        raise c.fail(f"{key}.of", "must be a list of at least two values")
    ops = [_operand(c, f"{key}.of[{i}]", item, scope) for i, item in enumerate(items)]
    types = sorted({k.type for _, k in ops})
    if len(types) > 1:
        raise c.fail(f"{key}.of", f"values of different types ({', '.join(types)})")
    formats = {k.format for _, k in ops}
    return {"of": tuple(op for op, _ in ops)}, Kind(types[0], formats.pop() if len(formats) == 1 else None)


def _is_empty(c, key, spec, scope):
    """True where the value is empty (NULL), e.g. 'still resident' = no removal date."""
    op, _ = _operand(c, f"{key}.of", spec["of"], scope)
    return {"of": op}, Kind("boolean", domain=(True, False))


def _year(c, key, spec, scope):
    """The year of a YYYY-MM month."""
    return {"of": _month_of(c, f"{key}.of", spec["of"], scope)}, Kind("integer")


def _month(c, key, spec, scope):
    """The month (1-12) of a YYYY-MM month."""
    return {"of": _month_of(c, f"{key}.of", spec["of"], scope)}, Kind("integer", domain=tuple(range(1, 13)))


def _fiscal_year(c, key, spec, scope):
    """The fiscal year (年度) of a YYYY-MM month: the year in which the fiscal year that
    contains it began; ``first_month`` is its first month (4 for Japanese 年度)."""
    first = c.integer(spec["first_month"], f"{key}.first_month", minimum=1, maximum=12)
    return ({"of": _month_of(c, f"{key}.of", spec["of"], scope), "first_month": first},
            Kind("integer"))


def _band(c, key, spec, scope):
    """Fixed-width bands of a non-negative integer labelled ``lo-hi`` (e.g. 0-4, 5-9 ...),
    everything from ``top`` on in one open band ``top+`` (e-Stat's age classes); a
    negative value is labelled ``<0``, outside any declared domain (the upload is refused)."""
    op, kind = _operand(c, f"{key}.of", spec["of"], scope)
    if kind.type != "integer":
        raise c.fail(f"{key}.of", f"bands need integer values; {op} gives {kind.type}")
    width = c.integer(spec["width"], f"{key}.width", minimum=1)
    top = c.integer(spec["top"], f"{key}.top", minimum=width)
    if top % width:
        raise c.fail(f"{key}.top", f"must be a multiple of width ({width}), so that no band is cut short")
    labels = tuple(f"{lo}-{lo + width - 1}" for lo in range(0, top, width)) + (f"{top}+",)
    return {"of": op, "width": width, "top": top}, Kind("string", domain=labels)


def _age(c, key, spec, scope):
    """Completed years from a birth date to a date, computed on the exact dates inside
    the ingest and top-coded at the birth date's rule's ``top_age``: only the age leaves."""
    born = exact_value(c, f"{key}.born", spec["born"], scope, ("date",), "the birth date")
    if born.rule != "birth_topcoded":
        raise c.fail(f"{key}.born", f"must be a birth date (rule birth_topcoded), whose top_age "
                                    f"top-codes the age; {born} has rule {born.rule!r}")
    at = spec["at"]
    if isinstance(at, dict):
        at = c.mapping(at, f"{key}.at", allowed={"year", "month", "day"}, required={"year", "month", "day"})
        year = exact_value(c, f"{key}.at.year", at["year"], scope, ("integer",), "the year")
        month = c.integer(at["month"], f"{key}.at.month", minimum=1, maximum=12)
        day = c.integer(at["day"], f"{key}.at.day", minimum=1, maximum=31)
        try:
            date(2001, month, day)      # a day every year has (not 29 February)
        except ValueError:
            raise c.fail(f"{key}.at", f"{month}/{day} is not a day of every year") from None
        at_value: ExactValue | DayOfYear = DayOfYear(year=year, month=month, day=day)
    else:
        at_value = exact_value(c, f"{key}.at", at, scope, ("date",), "the date the age is taken at")
    top = _source_of(scope, born).columns[born.column].params["top_age"]
    return {"born": born, "at": at_value, "top": int(top)}, Kind("integer")


def _case(c, key, spec, scope):
    """``then`` where a value is one of the listed ones, else ``else`` (empty if not
    given): ``when: {idou_type: [転出, 死亡]}``."""
    when = c.mapping(spec["when"], f"{key}.when")
    if len(when) != 1:
        raise c.fail(f"{key}.when", "must name exactly one value and the list it is tested against")
    (tested, values), = when.items()
    wkey = f"{key}.when.{tested}"
    op, kind = _operand(c, wkey, tested, scope)
    if not isinstance(values, list) or not values:
        raise c.fail(wkey, "must be a non-empty list of values")
    for i, v in enumerate(values):
        if not has_type(v, kind.type):
            raise c.fail(f"{wkey}[{i}]", f"{v!r} is not a {kind.type}")
        if kind.domain is not None and v not in kind.domain:
            raise c.fail(f"{wkey}[{i}]", f"{v!r} is not a value {op} can take ({', '.join(map(str, kind.domain))})")
    then, then_kind = _operand(c, f"{key}.then", spec["then"], scope)
    params = {"when": (op, tuple(values)), "then": then, "else": None}
    result = then_kind
    if "else" in spec:
        other, other_kind = _operand(c, f"{key}.else", spec["else"], scope)
        if other_kind.type != then_kind.type:
            raise c.fail(f"{key}.else", f"gives {other_kind.type} values, then: gives {then_kind.type}")
        params["else"] = other
        if other_kind.format != then_kind.format:
            result = Kind(then_kind.type)
    return params, Kind(result.type, result.format)


def _extract_month(c, key, spec, scope):
    """The month (YYYY-MM) of the upload's extract date, the snapshot's 基準年月: e.g. the
    tax year that applies at the extract (``fiscal_year`` of it)."""
    return {}, Kind("string", format="YYYY-MM")


def _total(c, key, spec, scope):
    """A total (``totals:``) looked up for the row: ``at`` gives, for each key the total is
    grouped ``by``, the row's raw column (``column``, ``alias.column``) or a derivation
    with a value of the same kind. Empty where no record of the total's source matches."""
    name = c.string(spec["total"], f"{key}.total")
    if name not in scope.totals:
        raise c.fail(f"{key}.total", f"unknown total {name!r} (totals: declares: {', '.join(scope.totals) or 'none'})")
    total = scope.totals[name]
    at = c.mapping(spec["at"], f"{key}.at", allowed=set(total.by), required=set(total.by))
    ops = []
    for k, wanted in total.by.items():
        akey = f"{key}.at.{k}"
        if isinstance(at[k], dict):
            op, kind = derivation(c, akey, at[k], scope)
            gives = kind.type if kind.type in ("integer", "string") else None
        else:
            op = key_value(c, akey, at[k], scope)
            gives = key_kind(op)
        if gives != key_kind(wanted):
            raise c.fail(akey, f"gives {gives or kind.type + ' values'}, but totals.{name}.by.{k} "
                               f"({wanted}) is {key_kind(wanted)}")
        ops.append((k, op))
    measure_type = "integer" if total.sum.type == "integer" else "float"
    return {"total": name, "at": tuple(ops)}, Kind(measure_type, measure=(total.source, total.sum.column))


def _bands(c, key, spec, scope):
    """The label of the class of a band scheme (``bands:``) holding a value of the scheme's
    measure (a person's value, or a total of it): a dimension whose domain is the labels."""
    name = c.string(spec["bands"], f"{key}.bands")
    if name not in scope.bands:
        raise c.fail(f"{key}.bands", f"unknown band scheme {name!r} (bands: declares: "
                                     f"{', '.join(scope.bands) or 'none'})")
    scheme = scope.bands[name]
    op, kind = _operand(c, f"{key}.of", spec["of"], scope)
    if kind.measure != scheme.measure:
        measured = f"{kind.measure[0]}.{kind.measure[1]}" if kind.measure else "no measure"
        raise c.fail(f"{key}.of", f"bands {name} classify {'.'.join(scheme.measure)} (bands.{name}.measure); "
                                  f"{op} gives {measured}")
    return {"of": op, "bands": scheme}, Kind("string", domain=scheme.labels)


def _source_of(scope: Scope, value: ExactValue) -> Source:
    return scope.source if value.join is None else scope.sources[scope.joins[value.join].source]


_DERIVATION_CHECKS = {
    "first_of": _first_of,
    "is_empty": _is_empty,
    "year": _year,
    "month": _month,
    "fiscal_year": _fiscal_year,
    "band": _band,
    "age": _age,
    "case": _case,
    "extract_month": _extract_month,
    "total": _total,
    "bands": _bands,
}
assert set(_DERIVATION_CHECKS) == set(DERIVATIONS)
