"""``load_policy``: read a policy file and validate it completely, section by section
(sources, bands, totals, views, roles, disclosure, purposes, store), into a frozen ``Policy``.

The order matters: bands and totals are checked against known sources, views against
known sources, bands and totals, roles and purposes against known views. The roles and purposes sections are small and checked here; the others have
their own modules.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from sekisho.policy.bands import read_bands, read_totals
from sekisho.policy.checker import Checker, PolicyError
from sekisho.policy.disclosure import read_disclosure
from sekisho.policy.model import Policy, Role, View
from sekisho.policy.sources import read_sources
from sekisho.policy.views import read_views
from sekisho.policy.vocabulary import MODES, ROLE_NAMES


def load_policy(path: str | Path) -> Policy:
    """Load and fully validate a policy file."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise PolicyError(path, "", f"cannot read the file ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(path, "", "the file is not UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyError(path, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}") from None
    c = Checker(path)
    top = c.section(doc, "", Policy)
    sources = read_sources(c, top["sources"])
    bands = read_bands(c, top.get("bands"), sources)
    totals = read_totals(c, top.get("totals"), sources)
    views = read_views(c, top["views"], sources, bands=bands, totals=totals)
    roles = _roles(c, top["roles"], views)
    disclosure = read_disclosure(c, top["disclosure"])
    purposes = _purposes(c, top["purposes"], views)
    views = {name: replace(view, purpose=purposes[name]) for name, view in views.items()}
    store = c.mapping(top.get("store", {}) or {}, "store", allowed={"keep_snapshots"})
    if "keep_snapshots" in store:
        c.integer(store["keep_snapshots"], "store.keep_snapshots", minimum=1)
    return Policy(
        path=path,
        version="sha256:" + hashlib.sha256(raw_bytes).hexdigest()[:16],
        name=c.string(top["name"], "name"),
        title_ja=c.string(top["title_ja"], "title_ja"),
        municipality_code=c.string(str(top["municipality_code"]), "municipality_code",
                                   pattern=r"\d{6}"),
        sources=sources, views=views, roles=roles, disclosure=disclosure,
        purposes=purposes, store=dict(store), bands=bands, totals=totals,
    )


def _roles(c: Checker, node: Any, views: dict[str, View]) -> dict[str, Role]:
    node = c.mapping(node, "roles")
    out: dict[str, Role] = {}
    flags = [f.name for f in fields(Role) if f.name.startswith("can_")]
    for name, spec in node.items():
        key = f"roles.{name}"
        if name not in ROLE_NAMES:
            raise c.fail(key, f"unknown role (expected one of {', '.join(ROLE_NAMES)})")
        spec = c.section(spec, key, Role)
        vnode = spec.get("views", [])
        if vnode == "all":
            vs = tuple(views)
        else:
            vs = c.string_list(vnode, f"{key}.views", allow_empty=True)
            for i, v in enumerate(vs):
                if v not in views:
                    raise c.fail(f"{key}.views[{i}]", f"unknown view {v!r}")
        modes = c.string_list(spec.get("modes", []), f"{key}.modes", allow_empty=True)
        for i, m in enumerate(modes):
            c.string(m, f"{key}.modes[{i}]", choices=MODES)
        if vs and not modes:
            raise c.fail(f"{key}.modes", "a role that reads views needs at least one mode")
        default = spec.get("default_mode")
        if default is not None:
            c.string(default, f"{key}.default_mode", choices=MODES)
            if default not in modes:
                raise c.fail(f"{key}.default_mode", f"{default!r} is not among the role's modes")
        elif modes:
            default = modes[0]
        granted = {f: c.boolean(spec.get(f, False), f"{key}.{f}") for f in flags}
        influence = c.boolean(spec.get("condition_influence", True), f"{key}.condition_influence")
        holds = c.boolean(spec.get("alert_holds", True), f"{key}.alert_holds")
        out[name] = Role(name=name, views=vs, modes=modes, default_mode=default, condition_influence=influence,
                         alert_holds=holds, **granted)
    for required in ROLE_NAMES:
        if required not in out:
            raise c.fail(f"roles.{required}", "required role is missing")
    return out


def _purposes(c: Checker, node: Any, views: dict[str, View]) -> dict[str, str]:
    node = c.mapping(node, "purposes")
    out = {}
    for name, text in node.items():
        if name not in views:
            raise c.fail(f"purposes.{name}", "no such view")
        out[name] = c.string(text, f"purposes.{name}")
    for name in views:
        if name not in out:
            raise c.fail(f"purposes.{name}", "every view needs its 利用目的 (purpose)")
    return out


def load_instance_policy(instance) -> Policy:
    """The policy in force for an instance."""
    return load_policy(instance.policy_path)
