"""The policy: what may be uploaded, how each raw column is abstracted, how each view
analysts see is built from those abstractions, who may do what, and the
disclosure-control settings.

A policy is YAML data (``policies/*.yaml``), never code. ``load_policy`` validates it
completely and returns frozen dataclasses; every problem raises ``PolicyError`` whose
message names the file, the key path and the problem, e.g.::

    policies/bad.yaml: views.resident_tax.columns.income_levy.bounds: lo (10) must be below hi (5)
    policies/bad.yaml: views.residents.columns.age_band.derive: unknown derivation 'bnd' (known: ...)

Two vocabularies are named here and implemented in ``sekisho.ingest`` (this module only
checks names, parameters and types, so the loader has no dependency on the ingest code;
tests keep each pair of registries equal):

* rules (``sources.*.columns.*.rule``, ``RULES``, implemented in ``sekisho.ingest.rules``):
  what happens to each raw column — the processing standard — and which values each
  rule *releases* to the views (``rule_releases``);
* view definitions (``views.*``, ``DERIVATIONS``, implemented in ``sekisho.ingest.views``
  and ``sekisho.ingest.derivations``): each view's ``source``, the ``joins`` that follow
  the source's declared references, and per column ``from:`` a released value or
  ``derive:`` a named derivation. Every name a view uses is resolved and type-checked
  here, so an upload never meets a view it cannot build and adding a dataset needs no
  Python. The vocabulary is described in ``policies/himeji.yaml`` above ``views:``.

Why one module of this size (one of the few over 400 lines): the model and both
vocabularies' checks belong in the lowest layer (guard, hub, services and ingest all
read this model) and must agree with each other. The YAML keys of each section are
derived from its dataclass (``_file_keys``), so each key is written once.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import Any, Union

import yaml

# ---- vocabularies ---------------------------------------------------------------

COLUMN_CLASSES = ("privacy_unit", "linkage", "dimension", "measure", "sensitive_measure")
VIEW_TYPES = ("string", "integer", "boolean", "float")
COLUMN_FORMATS = ("YYYY-MM",)   # formats the ingest guarantees for every non-NULL value
SOURCE_TYPES = ("code", "text", "date", "integer", "decimal")
# the type a raw value kept as it is has in a view; "date" is no view type: a
# day-precision date can reach a view only through a rule or derivation that coarsens it
KEPT_TYPE = {"code": "string", "text": "string", "date": "date", "integer": "integer", "decimal": "float"}
# rule name -> parameters it accepts (name -> required?)
RULES: dict[str, dict[str, bool]] = {
    "drop": {},
    "keep": {},
    "keyed_id": {"as": True, "namespace": True},
    "year_month": {"as": True},
    "birth_topcoded": {"top_age": True},
    "code_label": {"as": False, "labels": True},
    "locate": {"chome": True, "carry": True, "prefix": False},
    "position": {"axis": True},
    "record_key": {},
}
# rules after which a raw column's exact value stays inside the ingest's working database
# (never in the store) for the derivations that need it: the age at an event is computed
# on exact dates, a record key on a record's identity
EXACT_VALUE_RULES = ("keep", "year_month", "birth_topcoded", "record_key")
# the JIS X 0410 mesh codes the locate rule releases (1km, 500m, 250m)
MESH_NAMES = ("mesh1km", "mesh500m", "mesh250m")
# the coordinates of an address master's representative points (rule position)
AXES = ("latitude", "longitude")
# derivation name -> parameters it accepts (name -> required?); what each one computes
# is said by its checker below (``_DERIVATION_CHECKS``) and its SQL in sekisho.ingest.derivations
DERIVATIONS: dict[str, dict[str, bool]] = {
    "first_of": {"of": True},
    "is_empty": {"of": True},
    "year": {"of": True},
    "month": {"of": True},
    "fiscal_year": {"of": True, "first_month": True},
    "band": {"of": True, "width": True, "top": True},
    "age": {"born": True, "at": True},
    "case": {"when": True, "then": True, "else": False},
}
MODES = ("threshold", "dp")
PERIODS = ("month",)
# lowest disclosure.dp.epsilon_per_query_min a policy may set: a query's ε is split between
# its aggregates, and a share near the float limits breaks the DP mechanisms (diffprivlib's
# Snapping refuses ε <= 2 machine epsilons, Geometric noise overflows int64 near 1e-16);
# 1e-6 leaves room for millions of shares
EPSILON_FLOOR = 1e-6
ROLE_NAMES = ("steward", "analyst", "admin", "manager", "reports")
IDENTIFIER = r"[a-z][a-z0-9_]*"

# field metadata: a field the loader computes (not a key of the file), and a field whose
# key in the file differs from its name
COMPUTED = {"computed": True}


def _in_file_as(key: str) -> dict:
    return {"key": key}


class PolicyError(ValueError):
    """The policy file is invalid. The message names file, key path and problem."""

    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        super().__init__(f"{file}: {key or '(top level)'}: {problem}")


# ---- model: sources -------------------------------------------------------------------


@dataclass(frozen=True)
class SourceColumn:
    name: str = field(metadata=COMPUTED)
    type: str                       # one of SOURCE_TYPES
    rule: str                       # one of RULES
    reason: str                     # why this rule (加工基準の理由)
    required: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    length: int | None = None       # exact length for codes
    domain: tuple[str, ...] | None = None
    # a date on or before the extract date: an upload given no extract date takes the end
    # of the month of the latest such date (validity periods, due dates may lie beyond it)
    sets_extract_date: bool = False
    # rule locate: the source's reference to the address master whose points locate it
    locate_via: Reference | None = field(default=None, metadata=COMPUTED)


@dataclass(frozen=True)
class Reference:
    columns: tuple[str, ...]
    source: str
    target: tuple[str, ...]


@dataclass(frozen=True)
class Released:
    """A value a source column's rule releases to the views: the only values a view's
    ``from:`` may name, so a view cannot hold anything the processing standard did not
    release (a dropped column, an exact date, a raw identifier)."""
    name: str
    type: str                       # one of VIEW_TYPES, or "date" (a kept date)
    column: str                     # the raw column it comes from
    rule: str
    format: str | None = None
    domain: tuple | None = None     # the values it can take, when the policy knows them


@dataclass(frozen=True)
class Source:
    name: str = field(metadata=COMPUTED)
    file: str
    title_ja: str
    columns: dict[str, SourceColumn]
    unique: tuple[str, ...] = ()
    references: tuple[Reference, ...] = ()

    @property
    def released(self) -> dict[str, Released]:
        """Every value the rules of this source release, by name."""
        return {name: r for col in self.columns.values() for name, r in rule_releases(col).items()}


def rule_releases(col: SourceColumn) -> dict[str, Released]:
    """The values ``col``'s rule releases to the views, by name (what the processing
    standard lists as the rule's output; ``sekisho.ingest.rules`` produces exactly these)."""
    p = col.params

    def value(name: str, type_: str, **kw) -> tuple[str, Released]:
        return name, Released(name=name, type=type_, column=col.name, rule=col.rule, **kw)

    if col.rule == "keep":
        kept = KEPT_TYPE[col.type]
        return dict([value(col.name, kept, domain=col.domain if kept == "string" else None)])
    if col.rule == "keyed_id":
        return dict([value(p["as"], "string")])
    if col.rule == "year_month":
        return dict([value(p["as"], "string", format="YYYY-MM")])
    if col.rule == "code_label":
        labels = tuple(dict.fromkeys(str(v) for v in p["labels"].values()))
        return dict([value(p.get("as", col.name), "string", domain=labels)])
    if col.rule == "birth_topcoded":
        return dict([value("birth_ym", "string", format="YYYY-MM"), value("birth_year", "integer"),
                     value("age", "integer"), value("age_band", "string")])
    if col.rule == "locate":
        prefix = p.get("prefix", "")
        return dict(value(prefix + name, "string") for name in (*p["carry"], *MESH_NAMES))
    return {}   # drop, position, record_key: nothing leaves the raw table


# ---- model: view definitions ------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A released value (``from:``, or an operand of a derivation) of the view's source
    (``join`` None) or of a joined source (``alias.name``)."""
    join: str | None
    name: str
    released: Released

    def __str__(self) -> str:
        return f"{self.join}.{self.name}" if self.join else self.name


@dataclass(frozen=True)
class ExactValue:
    """The exact raw value of a source column, which its rule keeps inside the ingest
    (never in the store) for a derivation that needs it: the age at an event, a record
    key. Named by the raw column (``alias.column`` for a joined source)."""
    join: str | None
    column: str
    rule: str
    type: str                       # the source column's type

    def __str__(self) -> str:
        return f"{self.join}.{self.column}" if self.join else self.column


@dataclass(frozen=True)
class DayOfYear:
    """A fixed day of the year given by an integer source column, e.g. 1 January of the
    tax year (the assessment date of 住民税): ``{year: tax_year, month: 1, day: 1}``."""
    year: ExactValue
    month: int
    day: int


@dataclass(frozen=True)
class Derivation:
    """``derive: NAME`` with its parameters; operands are resolved (``Value``,
    ``ExactValue``, ``DayOfYear`` or a nested ``Derivation``)."""
    name: str                       # one of DERIVATIONS
    params: dict[str, Any]

    def __hash__(self) -> int:      # a Column stays hashable, as before it had an origin
        return hash((self.name, tuple(sorted(self.params.items()))))


Origin = Union[Value, Derivation]


@dataclass(frozen=True)
class Join:
    """A source joined to a view's source along one of the source's declared references
    (checked on every upload). Its target is the joined source's unique key, so a join
    adds columns, never rows: a view has exactly one row per record of its source."""
    alias: str
    source: str
    on: tuple[tuple[str, str], ...]     # (column of the view's source, column of the joined one)


@dataclass(frozen=True)
class RecordKey:
    """How a person-level view's hidden record key ``_rkey`` is derived, permanent per
    record across uploads and unknowable without the instance secret: from the person's
    secret seed alone (``record_key: person``, a view with one record per person), or
    from the seed, the view's name and the record's identity (``record_key: {record:
    COLUMN}``, a raw column that with the person identifies a record)."""
    record: ExactValue | None = None


# ---- model: views, roles, disclosure --------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str = field(metadata=COMPUTED)
    type: str                       # one of VIEW_TYPES
    cls: str = field(metadata=_in_file_as("class"))     # one of COLUMN_CLASSES
    description_ja: str
    domain: tuple | None = None
    bounds: tuple[float, float] | None = None
    format: str | None = None       # "YYYY-MM": a month; its year and month parts are row-level values
    origin: Origin | None = field(default=None, metadata=COMPUTED)    # from: / derive:


@dataclass(frozen=True)
class View:
    name: str = field(metadata=COMPUTED)
    title_ja: str
    source: str                     # the source with one record per row of the view
    columns: dict[str, Column]
    public: bool = False
    joins: dict[str, Join] = field(default_factory=dict)
    record_key: RecordKey | None = None     # person-level views only
    # a public view merging its source's records: one row per value of these columns
    one_row_per: tuple[str, ...] = ()
    purpose: str = field(default="", metadata=COMPUTED)

    @property
    def privacy_unit(self) -> str | None:
        return next((c.name for c in self.columns.values() if c.cls == "privacy_unit"), None)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source the view reads: its own, then those it joins."""
        return (self.source, *dict.fromkeys(j.source for j in self.joins.values()))


@dataclass(frozen=True)
class Role:
    name: str = field(metadata=COMPUTED)
    views: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    default_mode: str | None = None
    can_ingest: bool = False
    can_review_audit: bool = False
    can_read_reports: bool = False
    can_start_server: bool = False
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
    """Cell-key perturbation table parameters (ABS/ONS method). The range of record keys
    is not a parameter: they are stored as 0..255 and the guard's cell key is their sum
    mod 256 (``sekisho.guard.protect.cellkey.KEY_RANGE``)."""
    enabled: bool
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
    path: Path = field(metadata=COMPUTED)
    version: str = field(metadata=COMPUTED)     # sha256 digest of the file
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


def _file_keys(model: type) -> tuple[set[str], set[str]]:
    """(allowed, required) keys of ``model``'s section in a policy file: its fields under
    their file names, less those the loader computes; required = no default."""
    allowed, required = set(), set()
    for f in fields(model):
        if f.metadata.get("computed"):
            continue
        key = f.metadata.get("key", f.name)
        allowed.add(key)
        if f.default is MISSING and f.default_factory is MISSING:
            required.add(key)
    return allowed, required


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
            if isinstance(k, bool):     # YAML 1.1 reads on/off/yes/no/y/n as true/false
                raise self.fail(key, f"keys must be strings, got {k!r} (quote a key such as 'on' or 'no')")
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

    def section(self, node: Any, key: str, model: type, *, extra: set[str] = frozenset()) -> dict:
        """A mapping holding the keys of ``model`` (``_file_keys``), plus ``extra``."""
        allowed, required = _file_keys(model)
        return self.mapping(node, key, allowed=allowed | set(extra), required=required)

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

    def integer(self, node: Any, key: str, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        if isinstance(node, bool) or not isinstance(node, int):
            raise self.fail(key, f"must be an integer, got {_kind(node)}")
        if minimum is not None and node < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {node}")
        if maximum is not None and node > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {node}")
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
    top = c.section(doc, "", Policy)
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


# ---- sources ------------------------------------------------------------------------------


def _sources(c: _Checker, node: Any) -> dict[str, Source]:
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


def _locate_via(c: _Checker, key: str, source: Source, col: SourceColumn,
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


def _source_column(c: _Checker, key: str, name: str, spec: Any) -> SourceColumn:
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


# ---- views ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """What the definitions of one view may refer to: its source and the sources it joins."""
    view: str
    source: Source
    joins: dict[str, Join]
    sources: dict[str, Source]

    def split(self, c: _Checker, key: str, text: str) -> tuple[str | None, Source, str]:
        """``name`` (the view's source) or ``alias.name`` (a joined source)."""
        if "." not in text:
            return None, self.source, text
        alias, name = text.split(".", 1)
        if alias not in self.joins:
            known = ", ".join(self.joins) or "none"
            raise c.fail(key, f"no join named {alias!r} (views.{self.view}.joins declares: {known})")
        return alias, self.sources[self.joins[alias].source], name


@dataclass(frozen=True)
class _Kind:
    """What an operand gives: its type, and its format and possible values when known."""
    type: str
    format: str | None = None
    domain: tuple | None = None


def _views(c: _Checker, node: Any, sources: dict[str, Source]) -> dict[str, View]:
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
        scope = _Scope(view=name, source=source, joins=joins, sources=sources)
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
        out[name] = View(name=name, title_ja=c.string(spec["title_ja"], f"{key}.title_ja"),
                         source=source_name, columns=columns, public=public, joins=joins,
                         record_key=record_key, one_row_per=one_row_per)
    return out


def _joins(c: _Checker, key: str, node: Any, source: Source, sources: dict[str, Source]) -> dict[str, Join]:
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


def _record_key(c: _Checker, key: str, node: Any, public: bool, unit: Column | None,
                scope: _Scope) -> RecordKey | None:
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
        raise c.fail(key, f"must be 'person' or a mapping {{record: COLUMN}}, got {_kind(node)}")
    spec = c.section(node, key, RecordKey)
    record = _exact(c, f"{key}.record", spec["record"], scope, ("code", "text", "integer", "date"),
                    "a record identity")
    if record.join is not None:
        raise c.fail(f"{key}.record", "the record identity is a column of the view's own source")
    if not set(source.unique) <= {person, record.column}:
        raise c.fail(f"{key}.record", f"with the person ({person}), {record.column} must identify a "
                                      f"record: the unique key of {source.name} is "
                                      f"({', '.join(source.unique)})")
    return RecordKey(record=record)


def _view_column(c: _Checker, key: str, name: str, spec: Any, scope: _Scope) -> Column:
    spec = c.mapping(spec, key)
    column_keys, required = _file_keys(Column)
    if "from" in spec and "derive" in spec:
        raise c.fail(key, "give either from: (a released value) or derive: (a derivation), not both")
    if "derive" in spec:
        origin, kind = _derivation(c, key, spec, scope, extra=column_keys)
        c.mapping(spec, key, required=required)
        origin_key = f"{key}.derive"
    else:
        c.mapping(spec, key, allowed=column_keys | {"from"}, required=required)
        origin_key = f"{key}.from" if "from" in spec else key
        origin = _value(c, origin_key, spec.get("from", name), scope, implicit="from" not in spec)
        kind = _Kind(origin.released.type, origin.released.format, origin.released.domain)
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
            if not _has_type(v, ctype):
                raise c.fail(f"{key}.domain[{i}]", f"{v!r} is not a {ctype}")
        if len(set(d)) != len(d):
            raise c.fail(f"{key}.domain", "contains duplicates")
        if cls != "dimension":
            raise c.fail(f"{key}.domain", "only dimension columns declare a domain")
        outside = [v for v in (kind.domain or ()) if v not in d]
        if outside:
            raise c.fail(f"{key}.domain", f"its origin can give {outside[0]!r}, which the domain does not list")
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
                  domain=domain, bounds=bounds, format=fmt, origin=origin)


def _has_type(value: Any, type_: str) -> bool:
    if isinstance(value, bool):
        return type_ == "boolean"
    return {"string": isinstance(value, str), "integer": isinstance(value, int),
            "float": isinstance(value, (int, float))}.get(type_, False)


# ---- operands and derivations ------------------------------------------------------------------


def _value(c: _Checker, key: str, node: Any, scope: _Scope, implicit: bool = False) -> Value:
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


def _exact(c: _Checker, key: str, node: Any, scope: _Scope, types: tuple[str, ...], what: str) -> ExactValue:
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


def _operand(c: _Checker, key: str, node: Any, scope: _Scope) -> tuple[Origin, _Kind]:
    """A released value (``name``, ``alias.name``) or a nested derivation (a mapping)."""
    if isinstance(node, dict):
        return _derivation(c, key, node, scope)
    value = _value(c, key, node, scope)
    r = value.released
    return value, _Kind(r.type, r.format, r.domain)


def _derivation(c: _Checker, key: str, spec: dict, scope: _Scope,
                extra: set[str] = frozenset()) -> tuple[Derivation, _Kind]:
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


def _month_of(c: _Checker, key: str, node: Any, scope: _Scope) -> Origin:
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
    return {"of": tuple(op for op, _ in ops)}, _Kind(types[0], formats.pop() if len(formats) == 1 else None)


def _is_empty(c, key, spec, scope):
    """True where the value is empty (NULL), e.g. 'still resident' = no removal date."""
    op, _ = _operand(c, f"{key}.of", spec["of"], scope)
    return {"of": op}, _Kind("boolean", domain=(True, False))


def _year(c, key, spec, scope):
    """The year of a YYYY-MM month."""
    return {"of": _month_of(c, f"{key}.of", spec["of"], scope)}, _Kind("integer")


def _month(c, key, spec, scope):
    """The month (1-12) of a YYYY-MM month."""
    return {"of": _month_of(c, f"{key}.of", spec["of"], scope)}, _Kind("integer", domain=tuple(range(1, 13)))


def _fiscal_year(c, key, spec, scope):
    """The fiscal year (年度) of a YYYY-MM month: the year in which the fiscal year that
    contains it began; ``first_month`` is its first month (4 for Japanese 年度)."""
    first = c.integer(spec["first_month"], f"{key}.first_month", minimum=1, maximum=12)
    return ({"of": _month_of(c, f"{key}.of", spec["of"], scope), "first_month": first},
            _Kind("integer"))


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
    return {"of": op, "width": width, "top": top}, _Kind("string", domain=labels)


def _age(c, key, spec, scope):
    """Completed years from a birth date to a date, computed on the exact dates inside
    the ingest and top-coded at the birth date's rule's ``top_age``: only the age leaves."""
    born = _exact(c, f"{key}.born", spec["born"], scope, ("date",), "the birth date")
    if born.rule != "birth_topcoded":
        raise c.fail(f"{key}.born", f"must be a birth date (rule birth_topcoded), whose top_age "
                                    f"top-codes the age; {born} has rule {born.rule!r}")
    at = spec["at"]
    if isinstance(at, dict):
        at = c.mapping(at, f"{key}.at", allowed={"year", "month", "day"}, required={"year", "month", "day"})
        year = _exact(c, f"{key}.at.year", at["year"], scope, ("integer",), "the year")
        month = c.integer(at["month"], f"{key}.at.month", minimum=1, maximum=12)
        day = c.integer(at["day"], f"{key}.at.day", minimum=1, maximum=31)
        try:
            date(2001, month, day)      # a day every year has (not 29 February)
        except ValueError:
            raise c.fail(f"{key}.at", f"{month}/{day} is not a day of every year") from None
        at_value: ExactValue | DayOfYear = DayOfYear(year=year, month=month, day=day)
    else:
        at_value = _exact(c, f"{key}.at", at, scope, ("date",), "the date the age is taken at")
    top = _source_of(scope, born).columns[born.column].params["top_age"]
    return {"born": born, "at": at_value, "top": int(top)}, _Kind("integer")


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
        if not _has_type(v, kind.type):
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
            result = _Kind(then_kind.type)
    return params, _Kind(result.type, result.format)


def _source_of(scope: _Scope, value: ExactValue) -> Source:
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
}
assert set(_DERIVATION_CHECKS) == set(DERIVATIONS)


# ---- roles, disclosure, purposes ---------------------------------------------------------------


def _roles(c: _Checker, node: Any, views: dict[str, View]) -> dict[str, Role]:
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


def _disclosure(c: _Checker, node: Any) -> Disclosure:
    node = c.section(node, "disclosure", Disclosure)
    k = c.integer(node["k"], "disclosure.k", minimum=2)
    dom = c.section(node["dominance"], "disclosure.dominance", Dominance)
    dominance = Dominance(
        nk_n=c.integer(dom["nk_n"], "disclosure.dominance.nk_n", minimum=1),
        nk_k=c.number(dom["nk_k"], "disclosure.dominance.nk_k", positive=True, maximum=1.0),
        p_percent=c.number(dom["p_percent"], "disclosure.dominance.p_percent", positive=True,
                           maximum=1.0))
    pk = "disclosure.perturbation"
    pt = c.section(node["perturbation"], pk, Perturbation)
    perturbation = Perturbation(
        enabled=c.boolean(pt["enabled"], f"{pk}.enabled"),
        max_noise=c.integer(pt["max_noise"], f"{pk}.max_noise", minimum=0),
        variance=c.number(pt["variance"], f"{pk}.variance", positive=True),
        min_count=c.integer(pt["min_count"], f"{pk}.min_count", minimum=0),
        seed=c.string(str(pt["seed"]), f"{pk}.seed"))
    dk = "disclosure.dp"
    d = c.section(node["dp"], dk, DP)
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
    a = c.section(node["alerts"], ak, Alerts)
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
