"""What a role may see: the views, their columns, classes, domains and bounds.

Built once per (policy, role) and cached by the guard; the analysis passes only
consult this object, never the policy file or the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pyarrow as pa
from sqlglot.schema import MappingSchema

from sekisho.access import capabilities
from sekisho.policy.views import band_dependencies

# policy view types -> DuckDB types used to qualify columns and describe results
SQL_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "boolean": "BOOLEAN", "float": "DOUBLE"}
# DuckDB types (as DESCRIBE names them) -> the Arrow types DuckDB returns for them
# (``to_arrow_table`` with default settings; tests/test_guard_cold.py checks each one)
ARROW_TYPES = {
    "VARCHAR": pa.string(), "BOOLEAN": pa.bool_(), "DOUBLE": pa.float64(), "FLOAT": pa.float32(),
    "BIGINT": pa.int64(), "INTEGER": pa.int32(), "SMALLINT": pa.int16(), "TINYINT": pa.int8(),
    "UBIGINT": pa.uint64(), "UINTEGER": pa.uint32(), "USMALLINT": pa.uint16(), "UTINYINT": pa.uint8(),
    "DATE": pa.date32(),
}


def arrow_type(sql_type: str | None) -> pa.DataType | None:
    """The Arrow type DuckDB returns for a column of ``sql_type``, or None when it is not
    one of the plain types above (then only the engine can say)."""
    return ARROW_TYPES.get((sql_type or "").upper())


PRIVACY_UNIT = "privacy_unit"
LINKAGE = "linkage"
DIMENSION = "dimension"
MEASURE = "measure"
SENSITIVE = "sensitive_measure"
IDENTIFIER_CLASSES = (PRIVACY_UNIT, LINKAGE)
MEASURE_CLASSES = (MEASURE, SENSITIVE)


@dataclass(frozen=True)
class ColumnInfo:
    view: str
    name: str
    cls: str
    sql_type: str
    domain: tuple | None = None
    bounds: tuple[float, float] | None = None
    format: str | None = None
    # a keyed identifier's namespace (rule keyed_id): identifiers join only within one
    namespace: str | None = None
    # on every row a fixed-width band of another column of the view: (that column, width,
    # top), from how the policy derives it (``policy.views.band_dependencies``)
    band_of: tuple[str, int, int] | None = None


@dataclass(frozen=True)
class ViewInfo:
    name: str
    public: bool
    columns: dict[str, ColumnInfo]
    privacy_unit: str | None = None
    # the policy's record_key: one record per person (``person``), or the view column
    # that, with the person, identifies a record (``{record: C}`` with C kept as it is)
    person_unique: bool = False
    record_column: str | None = None
    # sets of view columns that, each fixed by the query to one literal, leave one row per
    # person: (record_column,) and the policy's ``unique_per_person`` (checked on upload)
    row_identities: tuple[tuple[str, ...], ...] = ()
    # the Japanese description of those columns (refusals name what to fix)
    labels: dict[str, str] = field(default_factory=dict)


# a cached sqlglot schema is rebuilt after this many queries: its lookup caches (keyed by
# the table expressions of the queries it saw) stay bounded
SCHEMA_USES = 256


@dataclass
class Catalog:
    views: dict[str, ViewInfo] = field(default_factory=dict)
    # [the schema() mapping it was built from, dialect, its sqlglot MappingSchema, uses left]
    _sqlglot: list | None = field(default=None, init=False, repr=False, compare=False)

    def schema(self) -> dict[str, dict[str, str]]:
        """The sqlglot schema of visible columns only (``_rkey`` is never visible)."""
        return {v.name: {c.name: c.sql_type for c in v.columns.values()} for v in self.views.values()}

    def sqlglot_schema(self, dialect: str) -> MappingSchema:
        """``schema()`` as sqlglot's ``MappingSchema`` for ``qualify``, built once per catalog
        rather than per query (building it normalises every view and column name). It is
        rebuilt whenever ``schema()`` no longer says what it was built from (the catalog
        was changed), and after ``SCHEMA_USES`` queries, so that the lookup caches
        sqlglot keeps in it stay bounded."""
        mapping = self.schema()
        cached = self._sqlglot
        if cached is not None and cached[0] == mapping and cached[1] == dialect and cached[3] > 0:
            cached[3] -= 1   # (a race between threads only rebuilds earlier)
            return cached[2]
        built = MappingSchema(mapping, dialect=dialect)
        self._sqlglot = [mapping, dialect, built, SCHEMA_USES - 1]
        return built


def catalog_for_role(policy, role_name: str, store_types: dict[str, dict[str, str]] | None = None) -> Catalog:
    """The views ``role_name`` may query. ``store_types`` (view -> column -> DuckDB type),
    when given, refines column types with what the snapshot actually stores."""
    cat = Catalog()
    for vname in capabilities(policy, role_name).views:
        view = policy.views[vname]
        cols = {}
        bands = band_dependencies(view, policy.sources) if hasattr(policy, "sources") else {}
        for c in view.columns.values():
            if store_types is not None and vname in store_types and c.name not in store_types[vname]:
                continue  # a column the snapshot does not hold cannot be queried
            sql_type = SQL_TYPES.get(c.type, "VARCHAR")
            if store_types and vname in store_types and c.name in store_types[vname]:
                sql_type = store_types[vname][c.name]
            cols[c.name] = ColumnInfo(view=vname, name=c.name, cls=c.cls, sql_type=sql_type,
                                      domain=tuple(c.domain) if c.domain else None,
                                      bounds=tuple(c.bounds) if c.bounds else None,
                                      format=getattr(c, "format", None),
                                      namespace=_namespace(policy, view, c), band_of=bands.get(c.name))
        for name, info in list(cols.items()):   # a band of a column the role cannot see: none
            if info.band_of is not None and info.band_of[0] not in cols:
                cols[name] = dataclasses.replace(info, band_of=None)
        unit = next((c.name for c in view.columns.values() if c.cls == PRIVACY_UNIT), None)
        person_unique, record_column = _record_identity(view)
        identities = ((record_column,),) if record_column is not None else ()
        declared = tuple(getattr(view, "unique_per_person", ()) or ())
        if declared and all(c in cols for c in declared):
            identities += (declared,)
        labels = {c: view.columns[c].description_ja for ident in identities for c in ident}
        cat.views[vname] = ViewInfo(name=vname, public=bool(view.public), columns=cols, privacy_unit=unit,
                                    person_unique=person_unique, record_column=record_column,
                                    row_identities=identities, labels=labels)
    return cat


def _namespace(policy, view, column) -> str | None:
    """The keyed_id namespace of a view column passed through from its own source."""
    origin = getattr(column, "origin", None)
    released = getattr(origin, "released", None)
    if released is None or getattr(origin, "join", None) is not None or released.rule != "keyed_id":
        return None
    source = policy.sources.get(view.source) if hasattr(policy, "sources") else None
    raw = source.columns.get(released.column) if source is not None else None
    return (raw.params or {}).get("namespace") if raw is not None else None


def _record_identity(view) -> tuple[bool, str | None]:
    """(one record per person, the view column keeping the record identity C unchanged)."""
    record_key = getattr(view, "record_key", None)
    if record_key is None or view.public:
        return False, None
    record = record_key.record
    if record is None:
        return True, None
    if record.join is not None:
        return False, None
    for col in view.columns.values():
        origin = col.origin
        released = getattr(origin, "released", None)
        if released is not None and getattr(origin, "join", None) is None and released.rule == "keep" \
                and released.column == record.column and released.name == record.column:
            return False, col.name
    return False, None
