"""The ``views:`` section, checked: each view's source and joins, its columns (where each
comes from, its type, class, domain, bounds and format), its privacy unit and record key.

A view can only hold what the processing standard released: every ``from:`` names a
released value and every ``derive:`` is checked in ``sekisho.policy.derivations``, so an
upload never meets a view it cannot build and adding a dataset needs no Python. The
vocabulary is described in ``policies/himeji.yaml`` above ``views:``.
"""

from __future__ import annotations

import re
from typing import Any

from sekisho.policy.checker import Checker, describe
from sekisho.policy.derivations import Kind, Scope, derivation, exact_value, has_type, released_value
from sekisho.policy.model import Bands, Column, Derivation, Join, RecordKey, Source, Total, Value, View, file_keys
from sekisho.policy.vocabulary import COLUMN_CLASSES, COLUMN_FORMATS, IDENTIFIER, VIEW_TYPES


def read_views(c: Checker, node: Any, sources: dict[str, Source], *, bands: dict[str, Bands] | None = None,
               totals: dict[str, Total] | None = None) -> dict[str, View]:
    node = c.mapping(node, "views")
    if not node:
        raise c.fail("views", "must declare at least one view")
    out: dict[str, View] = {}
    for name, spec in node.items():
        key = f"views.{name}"
        if not re.fullmatch(IDENTIFIER, name):
            raise c.fail(key, "view names are lower-case identifiers")
        spec = c.section(spec, key, View)
        source_name = c.string(spec["source"], f"{key}.source")
        if source_name not in sources:
            raise c.fail(f"{key}.source", f"unknown source {source_name!r}")
        source = sources[source_name]
        public = c.boolean(spec.get("public", False), f"{key}.public")
        joins = _joins(c, f"{key}.joins", spec.get("joins", {}) or {}, source, sources)
        scope = Scope(view=name, source=source, joins=joins, sources=sources, bands=bands or {},
                      totals=totals or {})
        cols_node = c.mapping(spec["columns"], f"{key}.columns")
        if not cols_node:
            raise c.fail(f"{key}.columns", "must declare at least one column")
        columns = {}
        for cname, cspec in cols_node.items():
            ckey = f"{key}.columns.{cname}"
            if not re.fullmatch(IDENTIFIER, cname):
                raise c.fail(ckey, "column names are lower-case identifiers (no leading _)")
            columns[cname] = _view_column(c, ckey, cname, cspec, scope)
        units = [col.name for col in columns.values() if col.cls == "privacy_unit"]
        if len(units) > 1:
            raise c.fail(f"{key}.columns", f"more than one privacy_unit column ({', '.join(units)})")
        if public and (units or any(col.cls in ("linkage", "sensitive_measure")
                                    for col in columns.values())):
            raise c.fail(f"{key}.public", "a public view may not hold person-level columns")
        if not public and not units:
            raise c.fail(f"{key}.columns", "a non-public view needs a privacy_unit column")
        unit = columns[units[0]] if units else None
        if unit is not None and not (isinstance(unit.origin, Value) and unit.origin.join is None
                                     and unit.origin.released.rule == "keyed_id"):
            raise c.fail(f"{key}.columns.{unit.name}",
                         "a privacy unit must come from: a keyed identifier (rule keyed_id) of the "
                         "view's own source: its record keys are derived from it")
        record_key = _record_key(c, f"{key}.record_key", spec.get("record_key"), public, unit, scope)
        one_row_per = c.string_list(spec.get("one_row_per", []), f"{key}.one_row_per", allow_empty=True)
        for i, col in enumerate(one_row_per):
            if col not in columns:
                raise c.fail(f"{key}.one_row_per[{i}]", f"{col!r} is not a column of the view")
        if one_row_per and not public:
            raise c.fail(f"{key}.one_row_per", "only a public view may merge records: a person-level "
                                               "view keeps one row per record, each with its record key")
        unique_per_person = _unique_per_person(c, f"{key}.unique_per_person", spec.get("unique_per_person"),
                                               columns, record_key, public)
        out[name] = View(name=name, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"),
                         source=source_name, columns=columns, public=public, joins=joins,
                         record_key=record_key, one_row_per=one_row_per, unique_per_person=unique_per_person)
    return out


def _joins(c: Checker, key: str, node: Any, source: Source, sources: dict[str, Source]) -> dict[str, Join]:
    node = c.mapping(node, key)
    out = {}
    for alias, target in node.items():
        jkey = f"{key}.{alias}"
        if not re.fullmatch(IDENTIFIER, alias):
            raise c.fail(jkey, "join names are lower-case identifiers")
        target = c.string(target, jkey)
        if target not in sources:
            raise c.fail(jkey, f"unknown source {target!r}")
        refs = [r for r in source.references if r.source == target]
        if len(refs) != 1:
            raise c.fail(jkey, f"a join follows exactly one reference, and sources.{source.name}.references "
                               f"declares {len(refs) or 'no'} reference{'s' if len(refs) > 1 else ''} "
                               f"to {target}")
        ref, joined = refs[0], sources[target]
        if set(ref.target) != set(joined.unique):
            raise c.fail(jkey, f"the reference's target ({', '.join(ref.target)}) must be the unique key "
                               f"of {target} (sources.{target}.unique), so that the join adds columns, "
                               "never rows")
        for mine, theirs in zip(ref.columns, ref.target):
            a, b = source.columns[mine], joined.columns[theirs]
            kept = a.rule == b.rule == "keep" and a.type == b.type
            keyed = (a.rule == b.rule == "keyed_id"
                     and a.params["namespace"] == b.params["namespace"])
            if not (kept or keyed):
                raise c.fail(jkey, f"cannot join {source.name}.{mine} to {target}.{theirs}: both must be "
                                   "kept (rule keep, same type) or keyed in the same namespace "
                                   f"(rule keyed_id); they are {a.rule} and {b.rule}")
        out[alias] = Join(alias=alias, source=target, on=tuple(zip(ref.columns, ref.target)))
    return out


def _record_key(c: Checker, key: str, node: Any, public: bool, unit: Column | None,
                scope: Scope) -> RecordKey | None:
    if public:
        if node is not None:
            raise c.fail(key, "a public view holds no person, so it has no record key")
        return None
    if node is None:
        raise c.fail(key, "a person-level view needs a record key: 'person' (one record per "
                          "person) or {record: COLUMN}")
    source = scope.source
    person = unit.origin.released.column if unit is not None else None
    if not source.unique:
        raise c.fail(key, f"sources.{source.name} declares no unique key, so its records cannot "
                          "be told apart")
    if node == "person":
        if set(source.unique) != {person}:
            raise c.fail(key, f"'person' needs one record per person: the unique key of {source.name} "
                              f"({', '.join(source.unique)}) must be {person}")
        return RecordKey()
    if not isinstance(node, dict):
        raise c.fail(key, f"must be 'person' or a mapping {{record: COLUMN}}, got {describe(node)}")
    spec = c.section(node, key, RecordKey)
    record = exact_value(c, f"{key}.record", spec["record"], scope, ("code", "text", "integer", "date"),
                    "a record identity")
    if record.join is not None:
        raise c.fail(f"{key}.record", "the record identity is a column of the view's own source")
    if not set(source.unique) <= {person, record.column}:
        raise c.fail(f"{key}.record", f"with the person ({person}), {record.column} must identify a "
                                      f"record: the unique key of {source.name} is "
                                      f"({', '.join(source.unique)})")
    return RecordKey(record=record)


def _unique_per_person(c: Checker, key: str, node: Any, columns: dict[str, Column],
                       record_key: RecordKey | None, public: bool) -> tuple[str, ...]:
    """``unique_per_person: [C, ...]``: dimension columns of a person-level view with
    several records per person that, with the person, identify one row (e.g. childcare:
    one certification per child and 認定年月). The ingest checks it on every upload; the
    guard reads one row per person where a query fixes each column to one literal."""
    if node is None:
        return ()
    if public:
        raise c.fail(key, "a public view holds no person, so no column identifies a person's row")
    if record_key is not None and record_key.record is None:
        raise c.fail(key, "record_key: person already gives one row per person")
    names = c.string_list(node, key)
    for i, col in enumerate(names):
        if col not in columns:
            raise c.fail(f"{key}[{i}]", f"{col!r} is not a column of the view")
        if columns[col].cls != "dimension":
            raise c.fail(f"{key}[{i}]", f"{col!r} is a {columns[col].cls} column: only dimension columns "
                                        "(which a query can fix to one value) identify a person's row")
    return names


def _view_column(c: Checker, key: str, name: str, spec: Any, scope: Scope) -> Column:
    spec = c.mapping(spec, key)
    column_keys, required = file_keys(Column)
    if "from" in spec and "derive" in spec:
        raise c.fail(key, "give either from: (a released value) or derive: (a derivation), not both")
    if "derive" in spec:
        origin, kind = derivation(c, key, spec, scope, extra=column_keys)
        c.mapping(spec, key, required=required)
        origin_key = f"{key}.derive"
    else:
        c.mapping(spec, key, allowed=column_keys | {"from"}, required=required)
        origin_key = f"{key}.from" if "from" in spec else key
        origin = released_value(c, origin_key, spec.get("from", name), scope, implicit="from" not in spec)
        kind = Kind(origin.released.type, origin.released.format, origin.released.domain)
    ctype = c.string(spec["type"], f"{key}.type", choices=VIEW_TYPES)
    cls = c.string(spec["class"], f"{key}.class", choices=COLUMN_CLASSES)
    if kind.type != ctype:
        gives = "day-precision dates" if kind.type == "date" else f"{kind.type} values"
        raise c.fail(origin_key, f"gives {gives}, but the column is declared {ctype}")
    fmt = c.string(spec["format"], f"{key}.format", choices=COLUMN_FORMATS) if "format" in spec else None
    if fmt is not None and (ctype != "string" or cls != "dimension"):
        raise c.fail(f"{key}.format", "only string dimension columns declare a format")
    if fmt is not None and kind.format != fmt:
        raise c.fail(f"{key}.format", f"its origin does not guarantee {fmt} values")
    domain = None
    if "domain" in spec:
        d = spec["domain"]
        if not isinstance(d, list) or not d:
            raise c.fail(f"{key}.domain", "must be a non-empty list of values")
        for i, v in enumerate(d):
            if not has_type(v, ctype):
                raise c.fail(f"{key}.domain[{i}]", f"{v!r} is not a {ctype}")
        if len(set(d)) != len(d):
            raise c.fail(f"{key}.domain", "contains duplicates")
        if cls != "dimension":
            raise c.fail(f"{key}.domain", "only dimension columns declare a domain")
        outside = [v for v in (kind.domain or ()) if v not in d]
        if outside:
            raise c.fail(f"{key}.domain", f"its origin can give {outside[0]!r}, which the domain does not list")
        domain = tuple(d)
    if isinstance(origin, Derivation) and origin.name == "bands":
        # a band scheme's labels are public and ordered: they are the column's domain
        if cls != "dimension":
            raise c.fail(f"{key}.class", "a banded value is a dimension (its classes are public)")
        if domain is not None and domain != kind.domain:
            raise c.fail(f"{key}.domain", f"a banded column's domain is its scheme's labels in their order "
                                          f"({', '.join(kind.domain)}); leave domain: out")
        domain = kind.domain
    bounds = None
    if "bounds" in spec:
        b = spec["bounds"]
        if not isinstance(b, list) or len(b) != 2:
            raise c.fail(f"{key}.bounds", "must be a list [lo, hi]")
        lo = c.number(b[0], f"{key}.bounds[0]")
        hi = c.number(b[1], f"{key}.bounds[1]")
        if not lo < hi:
            raise c.fail(f"{key}.bounds", f"lo ({b[0]}) must be below hi ({b[1]})")
        bounds = (lo, hi)
    if cls in ("measure", "sensitive_measure"):
        if bounds is None:
            raise c.fail(f"{key}.bounds", f"a {cls} needs public bounds [lo, hi]")
        if ctype not in ("integer", "float"):
            raise c.fail(f"{key}.type", f"a {cls} must be integer or float")
    elif bounds is not None:
        raise c.fail(f"{key}.bounds", "only measures declare bounds")
    return Column(name=name, type=ctype, cls=cls,
                  description_ja=c.string(spec["description_ja"], f"{key}.description_ja"),
                  domain=domain, bounds=bounds, format=fmt, origin=origin)


def band_dependencies(view: View, sources: dict[str, Source]) -> dict[str, tuple[str, int, int]]:
    """The view's columns that are, on every row, a fixed-width band of another of its
    columns: band column -> (that column, width, top). Known from how the policy derives
    them, never from the data: ``derive: band`` of the same value another column exposes
    (movements' age_band of age at the event), and the two values ``birth_topcoded``
    releases together (age and its e-Stat band, ``sekisho.ingest.rules.age_band``). The
    guard reasons over public domains with them (``sekisho.guard.enumerated_keys``)."""
    out: dict[str, tuple[str, int, int]] = {}
    by_origin = {c.origin: c.name for c in view.columns.values() if isinstance(c.origin, Derivation)}
    for col in view.columns.values():
        origin = col.origin
        if isinstance(origin, Derivation) and origin.name == "band" and origin.params.get("of") in by_origin:
            out[col.name] = (by_origin[origin.params["of"]], int(origin.params["width"]), int(origin.params["top"]))
    released = {}
    for col in view.columns.values():
        if isinstance(col.origin, Value) and col.origin.released.rule == "birth_topcoded":
            released[(col.origin.join, col.origin.released.column, col.origin.name)] = col.name
    for (join, raw, name), band in released.items():
        age = released.get((join, raw, "age"))
        if name != "age_band" or age is None:
            continue
        source = sources[view.joins[join].source] if join else sources[view.source]
        top = int(source.columns[raw].params["top_age"])
        out[band] = (age, 5, top)   # rules.birth_topcoded: age_band(age, top) = band(age, 5, top)
    return out


def band_label(value: int | None, width: int, top: int) -> str | None:
    """The label ``band`` gives an integer (``sekisho.ingest.rules.band``): lo-hi, top+."""
    if value is None:
        return None
    if value >= top:
        return f"{top}+"
    if value < 0:
        return "<0"
    lo = (value // width) * width
    return f"{lo}-{lo + width - 1}"
