"""The policy: what may be uploaded, how each raw column is abstracted, which views
analysts see, who may do what, and the disclosure-control settings.

A policy is YAML data (``policies/*.yaml``), never code. ``load_policy`` validates it
completely and returns frozen dataclasses; every problem raises ``PolicyError`` whose
message names the file, the key path and the problem, e.g.::

    policies/bad.yaml: views.resident_tax.columns.income_levy.bounds: lo (10) must be below hi (5)

The rules named in ``sources.*.columns.*.rule`` are implemented one per unit in
``sekisho.ingest.rules``; this module only checks that the name is one it knows
(``RULES``), so the loader has no dependency on the ingest code.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

# ---- vocabularies ---------------------------------------------------------------

COLUMN_CLASSES = ("privacy_unit", "linkage", "dimension", "measure", "sensitive_measure")
VIEW_TYPES = ("string", "integer", "boolean", "float")
COLUMN_FORMATS = ("YYYY-MM",)   # formats the ingest guarantees for every non-NULL value
SOURCE_TYPES = ("code", "text", "date", "integer", "decimal")
# rule name -> parameters it accepts (name -> required?)
RULES: dict[str, dict[str, bool]] = {
    "drop": {},
    "keep": {},
    "keyed_id": {"as": True, "namespace": True},
    "year_month": {"as": True},
    "birth_topcoded": {"top_age": True},
    "code_label": {"as": False, "labels": True},
    "locate": {"chome": True, "prefix": False},
    "position": {},
    "record_key": {},
}
MODES = ("threshold", "dp")
PERIODS = ("month",)
# lowest disclosure.dp.epsilon_per_query_min a policy may set: a query's ε is split between
# its aggregates, and a share near the float limits breaks the DP mechanisms (diffprivlib's
# Snapping refuses ε <= 2 machine epsilons, Geometric noise overflows int64 near 1e-16);
# 1e-6 leaves room for millions of shares
EPSILON_FLOOR = 1e-6
ROLE_NAMES = ("steward", "analyst", "admin", "manager", "reports")


class PolicyError(ValueError):
    """The policy file is invalid. The message names file, key path and problem."""

    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        super().__init__(f"{file}: {key or '(top level)'}: {problem}")


# ---- model ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceColumn:
    name: str
    type: str                       # one of SOURCE_TYPES
    required: bool
    rule: str                       # one of RULES
    params: dict[str, Any]
    reason: str                     # why this rule (加工基準の理由)
    length: int | None = None       # exact length for codes
    domain: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Reference:
    columns: tuple[str, ...]
    source: str
    target: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    name: str
    file: str
    title_ja: str
    columns: dict[str, SourceColumn]
    unique: tuple[str, ...]
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class Column:
    name: str
    type: str                       # one of VIEW_TYPES
    cls: str                        # one of COLUMN_CLASSES
    description_ja: str
    domain: tuple | None = None
    bounds: tuple[float, float] | None = None
    format: str | None = None       # "YYYY-MM": a month; its year and month parts are row-level values


@dataclass(frozen=True)
class View:
    name: str
    title_ja: str
    purpose: str
    public: bool
    columns: dict[str, Column]
    sources: tuple[str, ...] = ()

    @property
    def privacy_unit(self) -> str | None:
        return next((c.name for c in self.columns.values() if c.cls == "privacy_unit"), None)


@dataclass(frozen=True)
class Role:
    name: str
    views: tuple[str, ...]
    modes: tuple[str, ...]
    default_mode: str | None
    can_ingest: bool
    can_review_audit: bool
    can_read_reports: bool
    can_start_server: bool
    # threshold mode's condition-influence rule (disclosure.condition_influence) applies
    # to this role's queries; off only for a service running reviewed, fixed queries
    condition_influence: bool = True
    # alerts in disclosure.alerts.pause_on put this role's users on hold; off likewise
    alert_holds: bool = True


@dataclass(frozen=True)
class Dominance:
    nk_n: int
    nk_k: float
    p_percent: float


@dataclass(frozen=True)
class Perturbation:
    """Cell-key perturbation table parameters (ABS/ONS method)."""
    enabled: bool
    key_range: int                  # record keys are 0..key_range-1; cell key = sum mod key_range
    max_noise: int                  # D: largest absolute change of a count
    variance: float                 # V: variance of the noise distribution
    min_count: int                  # js: perturbed counts below this (but > 0) are shown as suppressed
    seed: str                       # public label mixed into the table generation


@dataclass(frozen=True)
class DP:
    epsilon_per_query_max: float
    budget_per_period: float
    period: str
    max_rows_per_person: int
    max_groups_per_person: int
    delta: float
    # smallest ε one query may ask for; below it diffprivlib's mechanisms fail (or the
    # noise is meaningless), so the guard refuses it before the ledger is touched
    epsilon_per_query_min: float = 0.001


@dataclass(frozen=True)
class Alerts:
    bulk_cells_per_hour: int
    near_duplicate_burst: int
    near_duplicate_window_s: int
    refusal_burst: int
    refusal_window_s: int
    # one population (same contributors) released under this many distinct query shapes
    # within the window: averaging over its decompositions (sekisho.guard.alerts)
    decomposition_burst: int = 12
    decomposition_window_s: int = 3600
    # alerts that put the user on hold until an admin resumes them (`sekisho users resume`)
    pause_on: tuple[str, ...] = ()


ALERT_NAMES = ("bulk", "near_duplicate", "refusals", "differencing", "decomposition")


@dataclass(frozen=True)
class Disclosure:
    k: int
    dominance: Dominance
    perturbation: Perturbation
    dp: DP
    alerts: Alerts
    # threshold mode: every condition must change who is counted by >= k contributors
    condition_influence: bool = True


@dataclass(frozen=True)
class Policy:
    path: Path
    version: str                    # sha256 digest of the file
    name: str
    title_ja: str
    municipality_code: str
    sources: dict[str, Source]
    views: dict[str, View]
    roles: dict[str, Role]
    disclosure: Disclosure
    purposes: dict[str, str]
    store: dict[str, Any] = field(default_factory=dict)

    def role(self, name: str) -> Role | None:
        return self.roles.get(name)


# ---- loader -----------------------------------------------------------------------


class _Checker:
    """Reads typed values from the parsed YAML, naming the key path on every problem."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, key: str, problem: str) -> PolicyError:
        return PolicyError(self.file, key, problem)

    def mapping(self, node: Any, key: str, *, allowed: set[str] | None = None,
                required: set[str] = frozenset()) -> dict:
        if not isinstance(node, dict):
            raise self.fail(key, f"must be a mapping, got {_kind(node)}")
        for k in node:
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, got {k!r}")
        if allowed is not None:
            unknown = sorted(set(node) - allowed)
            if unknown:
                raise self.fail(_join(key, unknown[0]),
                                f"unknown key (allowed: {', '.join(sorted(allowed))})")
        missing = sorted(required - set(node))
        if missing:
            raise self.fail(_join(key, missing[0]), "required key is missing")
        return node

    def string(self, node: Any, key: str, *, choices: tuple | None = None,
               pattern: str | None = None) -> str:
        if not isinstance(node, str) or not node.strip():
            raise self.fail(key, f"must be a non-empty string, got {_kind(node)}")
        if choices is not None and node not in choices:
            raise self.fail(key, f"{node!r} is not one of {', '.join(choices)}")
        if pattern is not None and not re.fullmatch(pattern, node):
            raise self.fail(key, f"{node!r} does not match {pattern}")
        return node

    def boolean(self, node: Any, key: str) -> bool:
        if not isinstance(node, bool):
            raise self.fail(key, f"must be true or false, got {_kind(node)}")
        return node

    def integer(self, node: Any, key: str, *, minimum: int | None = None) -> int:
        if isinstance(node, bool) or not isinstance(node, int):
            raise self.fail(key, f"must be an integer, got {_kind(node)}")
        if minimum is not None and node < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {node}")
        return node

    def number(self, node: Any, key: str, *, positive: bool = False,
               maximum: float | None = None) -> float:
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise self.fail(key, f"must be a number, got {_kind(node)}")
        if positive and not node > 0:
            raise self.fail(key, f"must be positive, got {node}")
        if maximum is not None and node > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {node}")
        return float(node)

    def string_list(self, node: Any, key: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(node, list):
            raise self.fail(key, f"must be a list, got {_kind(node)}")
        if not node and not allow_empty:
            raise self.fail(key, "must not be empty")
        out = []
        for i, item in enumerate(node):
            out.append(self.string(item, f"{key}[{i}]"))
        if len(set(out)) != len(out):
            raise self.fail(key, "contains duplicates")
        return tuple(out)


def _kind(node: Any) -> str:
    if node is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {node!r}", bool: f"{node}"}.get(
        type(node), f"{type(node).__name__} {node!r}")


def _join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)


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
    c = _Checker(path)
    top = c.mapping(doc, "", allowed={"name", "title_ja", "municipality_code", "sources", "views",
                                      "roles", "disclosure", "purposes", "store"},
                    required={"name", "title_ja", "municipality_code", "sources", "views",
                              "roles", "disclosure", "purposes"})
    sources = _sources(c, top["sources"])
    views = _views(c, top["views"], sources)
    roles = _roles(c, top["roles"], views)
    disclosure = _disclosure(c, top["disclosure"])
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
        purposes=purposes, store=dict(store),
    )


def _sources(c: _Checker, node: Any) -> dict[str, Source]:
    node = c.mapping(node, "sources")
    if not node:
        raise c.fail("sources", "must declare at least one source")
    out: dict[str, Source] = {}
    for name, spec in node.items():
        key = f"sources.{name}"
        spec = c.mapping(spec, key, allowed={"file", "title_ja", "columns", "unique", "references"},
                         required={"file", "title_ja", "columns"})
        file = c.string(spec["file"], f"{key}.file", pattern=r"[A-Za-z0-9_.-]+\.csv")
        cols_node = c.mapping(spec["columns"], f"{key}.columns")
        if not cols_node:
            raise c.fail(f"{key}.columns", "must declare at least one column")
        columns = {cname: _source_column(c, f"{key}.columns.{cname}", cname, cspec)
                   for cname, cspec in cols_node.items()}
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
            ref = c.mapping(ref, key, allowed={"columns", "source", "target"},
                            required={"columns", "source", "target"})
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
    return out


def _source_column(c: _Checker, key: str, name: str, spec: Any) -> SourceColumn:
    spec = c.mapping(spec, key, allowed={"type", "required", "rule", "params", "reason",
                                         "length", "domain"},
                     required={"type", "rule", "reason"})
    rule = c.string(spec["rule"], f"{key}.rule", choices=tuple(RULES))
    params = c.mapping(spec.get("params", {}) or {}, f"{key}.params", allowed=set(RULES[rule]))
    for pname, needed in RULES[rule].items():
        if needed and pname not in params:
            raise c.fail(f"{key}.params.{pname}", f"rule {rule!r} needs this parameter")
    if rule == "birth_topcoded":
        c.integer(params["top_age"], f"{key}.params.top_age", minimum=1)
    if rule == "code_label":
        labels = c.mapping(params["labels"], f"{key}.params.labels")
        if not labels:
            raise c.fail(f"{key}.params.labels", "must not be empty")
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
    return SourceColumn(
        name=name, type=ctype,
        required=c.boolean(spec.get("required", False), f"{key}.required"),
        rule=rule, params=dict(params), reason=c.string(spec["reason"], f"{key}.reason"),
        length=length, domain=domain)


def _views(c: _Checker, node: Any, sources: dict[str, Source]) -> dict[str, View]:
    node = c.mapping(node, "views")
    if not node:
        raise c.fail("views", "must declare at least one view")
    out: dict[str, View] = {}
    for name, spec in node.items():
        key = f"views.{name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise c.fail(key, "view names are lower-case identifiers")
        spec = c.mapping(spec, key, allowed={"title_ja", "public", "sources", "columns"},
                         required={"title_ja", "columns"})
        srcs = c.string_list(spec.get("sources", []), f"{key}.sources", allow_empty=True)
        for i, s in enumerate(srcs):
            if s not in sources:
                raise c.fail(f"{key}.sources[{i}]", f"unknown source {s!r}")
        public = c.boolean(spec.get("public", False), f"{key}.public")
        cols_node = c.mapping(spec["columns"], f"{key}.columns")
        if not cols_node:
            raise c.fail(f"{key}.columns", "must declare at least one column")
        columns = {}
        for cname, cspec in cols_node.items():
            ckey = f"{key}.columns.{cname}"
            if not re.fullmatch(r"[a-z][a-z0-9_]*", cname):
                raise c.fail(ckey, "column names are lower-case identifiers (no leading _)")
            columns[cname] = _view_column(c, ckey, cname, cspec)
        units = [col.name for col in columns.values() if col.cls == "privacy_unit"]
        if len(units) > 1:
            raise c.fail(f"{key}.columns", f"more than one privacy_unit column ({', '.join(units)})")
        if public and (units or any(col.cls in ("linkage", "sensitive_measure")
                                    for col in columns.values())):
            raise c.fail(f"{key}.public", "a public view may not hold person-level columns")
        if not public and not units:
            raise c.fail(f"{key}.columns", "a non-public view needs a privacy_unit column")
        out[name] = View(name=name, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"),
                         purpose="", public=public, columns=columns, sources=srcs)
    return out


def _view_column(c: _Checker, key: str, name: str, spec: Any) -> Column:
    spec = c.mapping(spec, key, allowed={"type", "class", "description_ja", "domain", "bounds", "format"},
                     required={"type", "class", "description_ja"})
    ctype = c.string(spec["type"], f"{key}.type", choices=VIEW_TYPES)
    cls = c.string(spec["class"], f"{key}.class", choices=COLUMN_CLASSES)
    fmt = c.string(spec["format"], f"{key}.format", choices=COLUMN_FORMATS) if "format" in spec else None
    if fmt is not None and (ctype != "string" or cls != "dimension"):
        raise c.fail(f"{key}.format", "only string dimension columns declare a format")
    domain = None
    if "domain" in spec:
        d = spec["domain"]
        if not isinstance(d, list) or not d:
            raise c.fail(f"{key}.domain", "must be a non-empty list of values")
        for i, v in enumerate(d):
            ok = {"string": isinstance(v, str), "integer": isinstance(v, int) and not isinstance(v, bool),
                  "boolean": isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool)}[ctype]
            if not ok:
                raise c.fail(f"{key}.domain[{i}]", f"{v!r} is not a {ctype}")
        if len(set(d)) != len(d):
            raise c.fail(f"{key}.domain", "contains duplicates")
        if cls != "dimension":
            raise c.fail(f"{key}.domain", "only dimension columns declare a domain")
        domain = tuple(d)
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
                  domain=domain, bounds=bounds, format=fmt)


def _roles(c: _Checker, node: Any, views: dict[str, View]) -> dict[str, Role]:
    node = c.mapping(node, "roles")
    out: dict[str, Role] = {}
    for name, spec in node.items():
        key = f"roles.{name}"
        if name not in ROLE_NAMES:
            raise c.fail(key, f"unknown role (expected one of {', '.join(ROLE_NAMES)})")
        spec = c.mapping(spec, key, allowed={"views", "modes", "default_mode", "can_ingest",
                                             "can_review_audit", "can_read_reports",
                                             "can_start_server", "condition_influence", "alert_holds"})
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
        flags = {f: c.boolean(spec.get(f, False), f"{key}.{f}")
                 for f in ("can_ingest", "can_review_audit", "can_read_reports", "can_start_server")}
        influence = c.boolean(spec.get("condition_influence", True), f"{key}.condition_influence")
        holds = c.boolean(spec.get("alert_holds", True), f"{key}.alert_holds")
        out[name] = Role(name=name, views=vs, modes=modes, default_mode=default, condition_influence=influence,
                         alert_holds=holds, **flags)
    for required in ROLE_NAMES:
        if required not in out:
            raise c.fail(f"roles.{required}", "required role is missing")
    return out


def _disclosure(c: _Checker, node: Any) -> Disclosure:
    node = c.mapping(node, "disclosure", allowed={"k", "dominance", "perturbation", "dp", "alerts",
                                                  "condition_influence"},
                     required={"k", "dominance", "perturbation", "dp", "alerts"})
    k = c.integer(node["k"], "disclosure.k", minimum=2)
    dom = c.mapping(node["dominance"], "disclosure.dominance", allowed={"nk_n", "nk_k", "p_percent"},
                    required={"nk_n", "nk_k", "p_percent"})
    dominance = Dominance(
        nk_n=c.integer(dom["nk_n"], "disclosure.dominance.nk_n", minimum=1),
        nk_k=c.number(dom["nk_k"], "disclosure.dominance.nk_k", positive=True, maximum=1.0),
        p_percent=c.number(dom["p_percent"], "disclosure.dominance.p_percent", positive=True,
                           maximum=1.0))
    pk = "disclosure.perturbation"
    pt = c.mapping(node["perturbation"], pk,
                   allowed={"enabled", "key_range", "max_noise", "variance", "min_count", "seed"},
                   required={"enabled", "key_range", "max_noise", "variance", "min_count", "seed"})
    perturbation = Perturbation(
        enabled=c.boolean(pt["enabled"], f"{pk}.enabled"),
        key_range=c.integer(pt["key_range"], f"{pk}.key_range", minimum=2),
        max_noise=c.integer(pt["max_noise"], f"{pk}.max_noise", minimum=0),
        variance=c.number(pt["variance"], f"{pk}.variance", positive=True),
        min_count=c.integer(pt["min_count"], f"{pk}.min_count", minimum=0),
        seed=c.string(str(pt["seed"]), f"{pk}.seed"))
    if perturbation.key_range != 256:
        raise c.fail(f"{pk}.key_range", "record keys are stored as 0..255, so key_range must be 256")
    dk = "disclosure.dp"
    d = c.mapping(node["dp"], dk, allowed={"epsilon_per_query_max", "epsilon_per_query_min", "budget_per_period",
                                           "period", "max_rows_per_person", "max_groups_per_person", "delta"},
                  required={"epsilon_per_query_max", "budget_per_period", "period",
                            "max_rows_per_person", "max_groups_per_person", "delta"})
    dp = DP(
        epsilon_per_query_max=c.number(d["epsilon_per_query_max"], f"{dk}.epsilon_per_query_max",
                                       positive=True),
        budget_per_period=c.number(d["budget_per_period"], f"{dk}.budget_per_period", positive=True),
        period=c.string(d["period"], f"{dk}.period", choices=PERIODS),
        max_rows_per_person=c.integer(d["max_rows_per_person"], f"{dk}.max_rows_per_person", minimum=1),
        max_groups_per_person=c.integer(d["max_groups_per_person"], f"{dk}.max_groups_per_person",
                                        minimum=1),
        delta=c.number(d["delta"], f"{dk}.delta", positive=True, maximum=0.01),
        epsilon_per_query_min=c.number(d.get("epsilon_per_query_min", DP.epsilon_per_query_min),
                                       f"{dk}.epsilon_per_query_min", positive=True))
    if not math.isfinite(dp.epsilon_per_query_max):
        raise c.fail(f"{dk}.epsilon_per_query_max", "must be finite")
    if dp.epsilon_per_query_max > dp.budget_per_period:
        raise c.fail(f"{dk}.epsilon_per_query_max", "exceeds budget_per_period")
    if dp.epsilon_per_query_min < EPSILON_FLOOR:
        raise c.fail(f"{dk}.epsilon_per_query_min", f"must be >= {EPSILON_FLOOR}")
    if dp.epsilon_per_query_min > dp.epsilon_per_query_max:
        raise c.fail(f"{dk}.epsilon_per_query_min", "exceeds epsilon_per_query_max")
    ak = "disclosure.alerts"
    a = c.mapping(node["alerts"], ak,
                  allowed={"bulk_cells_per_hour", "near_duplicate_burst", "near_duplicate_window_s",
                           "refusal_burst", "refusal_window_s", "decomposition_burst",
                           "decomposition_window_s", "pause_on"},
                  required={"bulk_cells_per_hour", "near_duplicate_burst", "near_duplicate_window_s",
                            "refusal_burst", "refusal_window_s"})
    pause_on = c.string_list(a.get("pause_on", []), f"{ak}.pause_on", allow_empty=True)
    for i, name in enumerate(pause_on):
        c.string(name, f"{ak}.pause_on[{i}]", choices=ALERT_NAMES)
    alerts = Alerts(**{f: c.integer(a[f], f"{ak}.{f}", minimum=1) for f in a if f != "pause_on"},
                    pause_on=pause_on)
    if alerts.decomposition_burst < 2:
        raise c.fail(f"{ak}.decomposition_burst", "must be >= 2 (one shape is no decomposition)")
    influence = c.boolean(node.get("condition_influence", True), "disclosure.condition_influence")
    return Disclosure(k=k, dominance=dominance, perturbation=perturbation, dp=dp, alerts=alerts,
                      condition_influence=influence)


def _purposes(c: _Checker, node: Any, views: dict[str, View]) -> dict[str, str]:
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
