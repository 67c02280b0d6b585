"""The policy as the rest of Sekisho reads it: frozen dataclasses for the sources and the
values their rules release, the view definitions (joins, origins, record keys), the
views, roles and disclosure settings, and the ``Policy`` holding them.

One module, so that a reader of the guard, the ingest or the hub sees the whole model
in one place. Each dataclass is also the schema of its section of the YAML file:
``file_keys`` derives a section's allowed and required keys from its fields (metadata
marks a field the loader computes, or one spelt differently in the file), so each key is
written once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from sekisho.policy.vocabulary import KEPT_TYPE, MESH_NAMES

# field metadata: a field the loader computes (not a key of the file), and a field whose
# key in the file differs from its name
COMPUTED = {"computed": True}


def _in_file_as(key: str) -> dict:
    return {"key": key}


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


# ---- model: bands and totals ----------------------------------------------------------------


@dataclass(frozen=True)
class BandClass:
    """One class of a band scheme: the values from ``lo`` (included) to ``hi`` (excluded;
    None for the last, open class), shown as ``label`` (in the policy file: ``from``,
    ``below``; 以上 / 未満 as a fee table writes them)."""
    label: str
    lo: float = field(metadata=_in_file_as("from"))
    hi: float | None = field(default=None, metadata=_in_file_as("below"))
    title_ja: str = ""


@dataclass(frozen=True)
class Bands:
    """A public band scheme (階層区分) of one sensitive measure, e.g. 所得割額 classes
    aligned to the 保育料 階層: a view column ``derive: bands`` exposes a value of that
    measure (a person's, or a household's total) only as the label of its class, a
    dimension whose ordered domain is the labels (then ``missing``, the label of no value)."""
    name: str = field(metadata=COMPUTED)
    title_ja: str
    measure: tuple[str, str]        # (source, column); in the file "source.column"
    classes: tuple[BandClass, ...]
    missing: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.classes) + ((self.missing,) if self.missing else ())


@dataclass(frozen=True)
class KeyValue:
    """A key a total is grouped by or looked up with: the raw column ``column`` (or
    ``alias.column``) of a source, kept (``namespace`` None) or a keyed identifier, which
    matches identifiers of the same namespace inside the ingest (never a hex ID)."""
    join: str | None
    column: str
    type: str                       # the source column's type
    namespace: str | None = None    # keyed identifiers: their namespace
    keyed_as: str | None = None     # ... and the name their rule releases

    def __str__(self) -> str:
        return f"{self.join}.{self.column}" if self.join else self.column


@dataclass(frozen=True)
class Total:
    """The sum of a measure over the records of a source that share key values, e.g. a
    household's 所得割額 per tax year (the sum over its members' records): a table inside
    the ingest only; a view column looks it up (``derive: total``) and, banded, exposes it
    as a unit feature. Keys (``by``) are raw columns of the source or of its ``joins``."""
    name: str = field(metadata=COMPUTED)
    title_ja: str
    source: str
    sum: ExactValue
    by: dict[str, KeyValue]
    joins: dict[str, Join] = field(default_factory=dict)


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
    # a person-level view with several rows per person: these view columns identify one
    # row with the person (where none of them is empty), checked on every upload; a query
    # fixing each to one literal reads one row per person (joins, DP bounds)
    unique_per_person: tuple[str, ...] = ()
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
    differencing_window_s: int = 7 * 86400   # a pair's two halves paced apart are still a pair
    # pairs of one user's populations on two snapshots whose contributors differ by 1..k-1
    # (the same filter asked before and after an upload), verified on the store; this many
    # within the window: releases across uploads averaged (sekisho.guard.alerts)
    upload_differencing_burst: int = 8
    upload_differencing_window_s: int = 62 * 86400
    # a region class split on two snapshots until a region's change has less noise variance
    # than this, a region changed by 1..k-1 (``sekisho.guard.upload_regions``)
    upload_decomposition_min_variance: int = 8
    # alerts that put the user on hold until an admin resumes them (`sekisho users resume`)
    pause_on: tuple[str, ...] = ()


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
    bands: dict[str, Bands] = field(default_factory=dict)
    totals: dict[str, Total] = field(default_factory=dict)

    def role(self, name: str) -> Role | None:
        return self.roles.get(name)


def file_keys(model: type) -> tuple[set[str], set[str]]:
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
