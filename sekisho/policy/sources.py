"""The ``sources:`` section, checked: the raw files an upload may hold, each column's
type and rule (the processing standard), unique keys, references between sources and
the address master the locate rule reads.

What each rule releases to the views is part of the model (``model.rule_releases``);
here each rule's parameters are checked and the references resolved, so the views can
then be checked against sources that are known to be consistent.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from sekisho.policy.checker import Checker
from sekisho.policy.model import Reference, Source, SourceColumn, rule_releases
from sekisho.policy.vocabulary import AXES, IDENTIFIER, KEPT_TYPE, RULES, SOURCE_TYPES


def read_sources(c: Checker, node: Any) -> dict[str, Source]:
    node = c.mapping(node, "sources")
    if not node:
        raise c.fail("sources", "must declare at least one source")
    out: dict[str, Source] = {}
    for name, spec in node.items():
        key = f"sources.{name}"
        if not re.fullmatch(IDENTIFIER, name):
            raise c.fail(key, "source names are lower-case identifiers")
        spec = c.section(spec, key, Source)
        file = c.string(spec["file"], f"{key}.file", pattern=r"[A-Za-z0-9_.-]+\.csv")
        cols_node = c.mapping(spec["columns"], f"{key}.columns")
        if not cols_node:
            raise c.fail(f"{key}.columns", "must declare at least one column")
        columns = {cname: _source_column(c, f"{key}.columns.{cname}", cname, cspec)
                   for cname, cspec in cols_node.items()}
        axes: dict[str, str] = {}
        for col in columns.values():
            if col.rule == "position":
                axis = col.params["axis"]
                if axis in axes:
                    raise c.fail(f"{key}.columns.{col.name}.params.axis", f"{axis} is already {axes[axis]}'s axis")
                axes[axis] = col.name
        if axes and len(axes) != len(AXES):
            missing = [a for a in AXES if a not in axes]
            raise c.fail(f"{key}.columns", f"an address master needs a position column per axis; none has "
                                           f"axis {missing[0]}")
        released_by: dict[str, str] = {}
        for col in columns.values():
            for value in rule_releases(col):
                if value in released_by:
                    raise c.fail(f"{key}.columns.{col.name}",
                                 f"its rule releases {value!r}, as {key}.columns.{released_by[value]}'s does")
                released_by[value] = col.name
        unique = c.string_list(spec.get("unique", []), f"{key}.unique", allow_empty=True)
        for i, u in enumerate(unique):
            if u not in columns:
                raise c.fail(f"{key}.unique[{i}]", f"column {u!r} is not declared in {key}.columns")
        out[name] = Source(name=name, file=file, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"),
                           columns=columns, unique=unique, references=())
    files = [s.file for s in out.values()]
    if len(set(files)) != len(files):
        raise c.fail("sources", "two sources name the same file")
    # references are checked once every source is known
    for name, spec in node.items():
        refs = []
        for i, ref in enumerate(spec.get("references", []) or []):
            key = f"sources.{name}.references[{i}]"
            ref = c.section(ref, key, Reference)
            cols = c.string_list(ref["columns"], f"{key}.columns")
            target_source = c.string(ref["source"], f"{key}.source")
            if target_source not in out:
                raise c.fail(f"{key}.source", f"unknown source {target_source!r}")
            target = c.string_list(ref["target"], f"{key}.target")
            if len(target) != len(cols):
                raise c.fail(f"{key}.target", "must name as many columns as 'columns'")
            for col in cols:
                if col not in out[name].columns:
                    raise c.fail(f"{key}.columns", f"column {col!r} is not declared in sources.{name}")
            for col in target:
                if col not in out[target_source].columns:
                    raise c.fail(f"{key}.target",
                                 f"column {col!r} is not declared in sources.{target_source}")
            refs.append(Reference(columns=cols, source=target_source, target=target))
        out[name] = replace(out[name], references=tuple(refs))
    for name in out:
        located = {col.name: replace(col, locate_via=_locate_via(c, f"sources.{name}.columns.{col.name}",
                                                                 out[name], col, out))
                   for col in out[name].columns.values() if col.rule == "locate"}
        out[name] = replace(out[name], columns={**out[name].columns, **located})
    return out


def _locate_via(c: Checker, key: str, source: Source, col: SourceColumn,
                sources: dict[str, Source]) -> Reference:
    """The reference from (``chome``, this column) to the address master, which must
    hold one position column per axis and keep the columns the rule carries."""
    chome = col.params["chome"]
    refs = [r for r in source.references if set(r.columns) == {chome, col.name}]
    if len(refs) != 1:
        raise c.fail(f"{key}.params", f"locate needs one reference from ({chome}, {col.name}) to the address "
                                      f"master in sources.{source.name}.references (found {len(refs)})")
    master = sources[refs[0].source]
    if not any(m.rule == "position" for m in master.columns.values()):
        raise c.fail(f"{key}.params", f"{master.name} is no address master: it has no position columns "
                                      "(rule position) to locate by")
    for released_name, master_column in col.params["carry"].items():
        kept = master.columns.get(master_column)
        if kept is None or kept.rule != "keep" or KEPT_TYPE[kept.type] != "string":
            raise c.fail(f"{key}.params.carry.{released_name}",
                         f"{master_column!r} is not a kept code or text column (rule keep) of the "
                         f"address master {master.name}")
    return refs[0]


def _source_column(c: Checker, key: str, name: str, spec: Any) -> SourceColumn:
    spec = c.section(spec, key, SourceColumn)
    rule = c.string(spec["rule"], f"{key}.rule", choices=tuple(RULES))
    params = c.mapping(spec.get("params", {}) or {}, f"{key}.params", allowed=set(RULES[rule]))
    for pname, needed in RULES[rule].items():
        if needed and pname not in params:
            raise c.fail(f"{key}.params.{pname}", f"rule {rule!r} needs this parameter")
    for pname in ("as", "namespace", "chome", "prefix"):
        if pname in params:
            c.string(params[pname], f"{key}.params.{pname}")
    if "as" in params:
        c.string(params["as"], f"{key}.params.as", pattern=IDENTIFIER)
    if rule == "birth_topcoded":
        c.integer(params["top_age"], f"{key}.params.top_age", minimum=1)
    if rule == "code_label":
        labels = c.mapping(params["labels"], f"{key}.params.labels")
        if not labels:
            raise c.fail(f"{key}.params.labels", "must not be empty")
    if rule == "position":
        c.string(params["axis"], f"{key}.params.axis", choices=AXES)
    if rule == "locate":
        carry = c.mapping(params["carry"], f"{key}.params.carry")
        for released_name, master_column in carry.items():
            if not re.fullmatch(IDENTIFIER, released_name):
                raise c.fail(f"{key}.params.carry.{released_name}", "released names are lower-case identifiers")
            c.string(master_column, f"{key}.params.carry.{released_name}")
    ctype = c.string(spec["type"], f"{key}.type", choices=SOURCE_TYPES)
    length = None
    if "length" in spec:
        length = c.integer(spec["length"], f"{key}.length", minimum=1)
    domain = None
    if "domain" in spec:
        domain = c.string_list([str(v) for v in spec["domain"]] if isinstance(spec["domain"], list)
                               else spec["domain"], f"{key}.domain")
    if rule == "code_label":
        missing = sorted(set(domain or ()) - {str(k) for k in params["labels"]})
        if missing:
            raise c.fail(f"{key}.params.labels", f"no label for domain value {missing[0]!r}")
    sets_extract_date = c.boolean(spec.get("sets_extract_date", False), f"{key}.sets_extract_date")
    if sets_extract_date and ctype != "date":
        raise c.fail(f"{key}.sets_extract_date", f"only a date column can set the extract date, not a {ctype}")
    return SourceColumn(
        name=name, type=ctype,
        required=c.boolean(spec.get("required", False), f"{key}.required"),
        rule=rule, params=dict(params), reason=c.string(spec["reason"], f"{key}.reason"),
        length=length, domain=domain, sets_extract_date=sets_extract_date)
