"""The ``bands:`` and ``totals:`` sections, checked: public band schemes (階層区分) of
sensitive measures, and totals of a measure over records sharing keys (a household's
所得割額 per tax year).

A view exposes a sensitive measure in bands only through ``derive: bands`` naming a
scheme declared here, never through an analyst's literals: the classes are public, so a
banded column is a dimension whose ordered domain is the labels. A scheme must classify
every value exactly once (classes sorted, neither overlapping nor leaving gaps); a value
below the first class is refused at upload. Totals exist only inside the ingest: a view
looks one up (``derive: total``) and normally bands it, making a household's income a
unit feature of each member's row.
"""

from __future__ import annotations

import re
from typing import Any

from sekisho.policy.checker import Checker
from sekisho.policy.derivations import Scope, exact_value, key_value
from sekisho.policy.model import BandClass, Bands, Source, Total
from sekisho.policy.views import _joins
from sekisho.policy.vocabulary import BAND_OUTSIDE, IDENTIFIER


def read_bands(c: Checker, node: Any, sources: dict[str, Source]) -> dict[str, Bands]:
    node = c.mapping(node if node is not None else {}, "bands")
    out = {}
    for name, spec in node.items():
        key = f"bands.{name}"
        if not re.fullmatch(IDENTIFIER, name):
            raise c.fail(key, "band scheme names are lower-case identifiers")
        spec = c.section(spec, key, Bands)
        measure = _measure(c, f"{key}.measure", spec["measure"], sources)
        integral = sources[measure[0]].columns[measure[1]].type == "integer"
        items = spec["classes"]
        if not isinstance(items, list) or len(items) < 2:
            raise c.fail(f"{key}.classes", "must be a list of at least two classes")
        classes: list[BandClass] = []
        for i, item in enumerate(items):
            ckey = f"{key}.classes[{i}]"
            item = c.section(item, ckey, BandClass)
            label = c.string(item["label"], f"{ckey}.label")
            lo = _edge(c, f"{ckey}.from", item["from"], integral)
            hi = _edge(c, f"{ckey}.below", item["below"], integral) if "below" in item else None
            if hi is None and i != len(items) - 1:
                raise c.fail(f"{ckey}.below", "only the last class may be open (no below:)")
            if hi is not None and not lo < hi:
                raise c.fail(f"{ckey}.below", f"must be above from ({_num(lo)}), got {_num(hi)}")
            title = c.string(item["title_ja"], f"{ckey}.title_ja") if "title_ja" in item else ""
            classes.append(BandClass(label=label, lo=lo, hi=hi, title_ja=title))
        for i in range(1, len(classes)):   # sorted first: an unsorted list is not a list of overlaps
            if classes[i].lo < classes[i - 1].lo:
                raise c.fail(f"{key}.classes[{i}].from", f"classes are not sorted: from {_num(classes[i].lo)} "
                                                         f"comes after classes[{i - 1}] from {_num(classes[i - 1].lo)}")
        for i in range(1, len(classes)):
            prev, lo = classes[i - 1], classes[i].lo
            if lo < prev.hi:
                raise c.fail(f"{key}.classes[{i}].from", f"overlaps classes[{i - 1}] ({_num(prev.lo)} to below "
                                                         f"{_num(prev.hi)}): a value would fall in two classes")
            if lo > prev.hi:
                raise c.fail(f"{key}.classes[{i}].from", f"leaves a gap after classes[{i - 1}] (below "
                                                         f"{_num(prev.hi)}): values from {_num(prev.hi)} to below "
                                                         f"{_num(lo)} fall in no class")
        missing = c.string(spec["missing"], f"{key}.missing") if "missing" in spec else None
        labels = [cl.label for cl in classes] + ([missing] if missing else [])
        for i, label in enumerate(labels):
            where = f"{key}.missing" if missing and i == len(labels) - 1 else f"{key}.classes[{i}].label"
            if label == BAND_OUTSIDE:
                raise c.fail(where, f"{BAND_OUTSIDE!r} is reserved for values no class holds")
            if label in labels[:i]:
                raise c.fail(where, f"label {label!r} is used twice")
        out[name] = Bands(name=name, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"),
                          measure=measure, classes=tuple(classes), missing=missing)
    return out


def _measure(c: Checker, key: str, node: Any, sources: dict[str, Source]) -> tuple[str, str]:
    """``source.column``: a kept integer or decimal column of a source."""
    text = c.string(node, key)
    if text.count(".") != 1:
        raise c.fail(key, f"unknown measure {text!r}: name it source.column, e.g. resident_tax.income_levy")
    source, column = text.split(".")
    if source not in sources:
        raise c.fail(key, f"unknown measure {text!r}: no source {source!r} (sources: {', '.join(sources)})")
    col = sources[source].columns.get(column)
    if col is None:
        raise c.fail(key, f"unknown measure {text!r}: sources.{source} has no column {column!r}")
    if col.type not in ("integer", "decimal") or col.rule != "keep":
        raise c.fail(key, f"{text!r} is not a measure: bands classify a kept (rule keep) integer or decimal "
                          f"column; it is a {col.type} with rule {col.rule!r}")
    return source, column


def _edge(c: Checker, key: str, node: Any, integral: bool) -> float:
    value = c.number(node, key)
    if integral and not value.is_integer():
        raise c.fail(key, f"the measure is an integer: class bounds are integers, got {node}")
    return int(value) if integral else value


def _num(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,g}"


def read_totals(c: Checker, node: Any, sources: dict[str, Source]) -> dict[str, Total]:
    node = c.mapping(node if node is not None else {}, "totals")
    out = {}
    for name, spec in node.items():
        key = f"totals.{name}"
        if not re.fullmatch(IDENTIFIER, name):
            raise c.fail(key, "total names are lower-case identifiers")
        spec = c.section(spec, key, Total)
        source_name = c.string(spec["source"], f"{key}.source")
        if source_name not in sources:
            raise c.fail(f"{key}.source", f"unknown source {source_name!r}")
        source = sources[source_name]
        joins = _joins(c, f"{key}.joins", spec.get("joins", {}) or {}, source, sources)
        scope = Scope(view=name, source=source, joins=joins, sources=sources, section="totals")
        summed = exact_value(c, f"{key}.sum", spec["sum"], scope, ("integer", "decimal"), "the measure summed")
        if summed.join is not None or summed.rule != "keep":
            raise c.fail(f"{key}.sum", "the measure summed is a kept (rule keep) column of the total's own source")
        by_node = c.mapping(spec["by"], f"{key}.by")
        if not by_node:
            raise c.fail(f"{key}.by", "must name at least one key")
        by = {}
        for k, value in by_node.items():
            if not re.fullmatch(IDENTIFIER, k):
                raise c.fail(f"{key}.by.{k}", "key names are lower-case identifiers")
            by[k] = key_value(c, f"{key}.by.{k}", value, scope)
        out[name] = Total(name=name, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"), source=source_name,
                          sum=summed, by=by, joins=joins)
    return out
