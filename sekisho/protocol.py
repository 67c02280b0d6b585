"""The guard service's wire protocol, shared by the service and the ibis client.

``sekisho.services.guard`` (the server) and ``sekisho.client.transport`` (the analysts'
kernels) must agree on the endpoints, the content types, where the disclosure summary
travels, what a request looks like and how a refusal is written; each of those is
defined here once (``hub/guard-openapi.yaml`` describes the same for other clients).

Per-cell status and accuracy (issue 19) travel with every answer as a second Arrow
table, the *cells table*, row-aligned with the answer (row i describes row i): for
every answer column that carries a protected value, three columns ``<name>:status``
(``released``, ``suppressed_k``, ``suppressed_dominance``, ``partial`` for an aggregate
over cells some of which were suppressed, ``widened`` for a cell answered without
conditions that change it by fewer than k (threshold mode, ``sekisho.guard.cell_widening``);
NULL where the guard could
not follow the value through post-processing), ``<name>:low`` and ``<name>:high`` (the
accuracy interval: ±D for threshold counts, ±r·value for non-negative threshold sums,
the 95% interval of the DP noise; NULL where none is stated). Each field's metadata
names its answer column (``sekisho.column``), its part (``sekisho.part``) and the kind
of accuracy (``sekisho.accuracy``). On the wire the cells table is an Arrow IPC stream,
base64-encoded, in the answer's schema metadata under ``CELLS_METADATA_KEY`` (one
response, one stream; clients that do not know it see an unchanged answer), and in a
JSON answer under ``"cells"`` (``{"columns", "rows"}``). :func:`attach_cells` and
:func:`split_cells` are the two ends.

Who checks what:

* **this module** parses the *envelope*: a JSON object with only the request's keys,
  each of its declared JSON type (:class:`QueryRequest`, :class:`DescribeRequest`); a
  malformed envelope is ``bad_request`` naming the key;
* **the guard** validates the *values* — the SQL, the mode against the role, ε against
  the policy, the user — once, for every entry point (HTTP, CLI, reports in-process),
  and refuses with its own codes;
* :func:`status_for` maps every code, the envelope's, the service's authorization
  denials and the guard's refusals alike, to one HTTP status.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, ClassVar

from sekisho.errors import SekishoError

# ---- endpoints and content ---------------------------------------------------------------

QUERY_PATH = "api/query"          # POST QueryRequest    -> Arrow IPC stream or JSON result
DESCRIBE_PATH = "api/describe"    # POST DescribeRequest -> {"columns": [...]}, no data read
VIEWS_PATH = "api/views"          # GET -> {"user", "role", "views"}
BUDGET_PATH = "api/budget"        # GET -> {"user", "role", "period", "total", "spent", "remaining"}
OPENAPI_PATH = "api/openapi.yaml"

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON_CONTENT = "application/json; charset=utf-8"
FORMATS = ("arrow", "json")

#: Arrow results carry the disclosure summary in the schema metadata under this key
#: (UTF-8 JSON, the authoritative copy) and in this header (ASCII JSON, for clients that
#: do not read Arrow metadata)
SUMMARY_METADATA_KEY = b"sekisho.summary"
SUMMARY_HEADER = "X-Sekisho-Summary"

#: the cells table (per-cell status and accuracy), base64 Arrow IPC, in the answer's metadata
CELLS_METADATA_KEY = b"sekisho.cells"
CELL_COLUMN_KEY = b"sekisho.column"
CELL_PART_KEY = b"sekisho.part"
CELL_ACCURACY_KEY = b"sekisho.accuracy"
CELL_PARTS = ("status", "low", "high")

#: the largest request body the service reads: a query of the guard's maximal length
#: (100,000 characters) even when every character is JSON-escaped
MAX_BODY_BYTES = 2_000_000


# ---- errors ----------------------------------------------------------------------------------

#: HTTP status of every code that is not a guard refusal; a guard refusal is 422
STATUS_OF_CODE: dict[str, int] = {
    "bad_request": 400,              # the envelope is malformed (this module)
    "unauthenticated": 401,          # no hub token
    "forbidden": 403,                # the hub refused the request
    "invalid_token": 403,            # the service's authorization denials (audited there)
    "not_a_person": 403,
    "missing_scope": 403,
    "no_role": 403,
    "role_not_allowed": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "internal_error": 500,           # a bug; logged with its traceback by the service
    "audit_unavailable": 503,        # the audit trail cannot be written: nothing was done
    "guard_busy": 503,               # no execution slot within the query's time: load, not the query
}
REFUSAL_STATUS = 422

#: refusals of the guard (audited as such) answered with another status than 422: a
#: matter of load, not of the query, which clients show as refusals all the same
REFUSALS_WITH_OWN_STATUS = frozenset({"guard_busy"})


def status_for(code: str) -> int:
    """The HTTP status that answers ``code``: the table above, else 422 (a guard refusal)."""
    return STATUS_OF_CODE.get(code, REFUSAL_STATUS)


def is_refusal(status: int, code: str) -> bool:
    """Whether an error answered with ``status`` and ``code`` is the guard's refusal (the
    client's ``GuardRefusal``) rather than a failure to ask it (``GuardError``)."""
    return status == REFUSAL_STATUS or (code in REFUSALS_WITH_OWN_STATUS and status == status_for(code))


@dataclass(frozen=True)
class ErrorEnvelope:
    """How the service writes any failure: ``{"code", "reason", "part"}``.

    ``code`` is stable (a guard refusal code or one of ``STATUS_OF_CODE``), ``reason``
    bilingual text, ``part`` the offending SQL fragment or request key (or null).
    """

    code: str
    reason: str
    part: str | None = None

    @property
    def status(self) -> int:
        return status_for(self.code)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "part": self.part}

    @classmethod
    def from_json(cls, data: Any, status: int) -> "ErrorEnvelope":
        """Read an error body answered with HTTP ``status``; what is missing is filled from
        the status (a proxy in between may answer with a body of its own)."""
        data = data if isinstance(data, dict) else {}
        code = data.get("code") if isinstance(data.get("code"), str) else None
        reason = data.get("reason") if isinstance(data.get("reason"), str) else None
        part = data.get("part")
        if code is None:
            code = "refused" if status == REFUSAL_STATUS else f"http_{status}"
        if reason is None:
            reason = ("refused by the guard / 照会は拒否されました" if status == REFUSAL_STATUS
                      else f"the guard service answered {status}")
        return cls(code, reason, None if part is None else str(part))


class RequestError(SekishoError):
    """The request envelope is malformed (``bad_request``); ``part`` names the key at fault."""

    code = "bad_request"

    def __init__(self, reason: str, part: str | None = None):
        super().__init__(reason)
        self.reason, self.part = reason, part

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope(self.code, self.reason, self.part)


# ---- requests --------------------------------------------------------------------------------

_JSON_TYPE_NAMES = {str: "a string", float: "a number", type(None): "null"}


def _parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise RequestError("request body is empty; expected a JSON object / 本文が空です")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not UTF-8 (byte {e.start}) / 本文が UTF-8 ではありません") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e.msg} at line {e.lineno}, "
                           f"column {e.colno} / JSON として読めません") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__} "
                           "/ JSON オブジェクトを送ってください")
    return data


def _of_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):    # JSON true/false is not a number here
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _fields(data: dict[str, Any], fields: dict[str, tuple[type, ...]], required: tuple[str, ...]) -> None:
    """Only the declared keys, the required ones present, each of its declared JSON type."""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RequestError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                           f"{', '.join(sorted(fields))} / 不明なキーがあります", unknown[0])
    for key, types in fields.items():
        if key not in data:
            if key in required:
                raise RequestError(f"key {key!r} is missing / {key} が必要です", key)
            continue
        if not _of_type(data[key], types):
            expected = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
            raise RequestError(f"key {key!r} must be {expected} (got {type(data[key]).__name__}) "
                               f"/ {key} の型が正しくありません", key)


@dataclass(frozen=True)
class QueryRequest:
    """``POST api/query``. ``mode`` None: the role's default; ``epsilon`` for DP only (the
    guard refuses it with another mode: validated once, there); ``format`` how the
    protected table comes back (``arrow`` or ``json``)."""

    sql: str
    mode: str | None = None
    epsilon: float | None = None
    format: str = "arrow"

    FIELDS: ClassVar[dict[str, tuple[type, ...]]] = {
        "sql": (str,), "mode": (str, type(None)), "epsilon": (float, type(None)), "format": (str,)}

    @classmethod
    def from_body(cls, body: bytes) -> "QueryRequest":
        data = _parse_object(body)
        _fields(data, cls.FIELDS, required=("sql",))
        fmt = data.get("format", "arrow")
        if fmt not in FORMATS:
            raise RequestError(f"key 'format' must be one of {', '.join(FORMATS)} (got {fmt!r}) "
                               "/ format は arrow か json です", "format")
        # ε is part of a DP request only: sent with another mode it would be silently unused
        return cls(sql=data["sql"], mode=data.get("mode"), epsilon=data.get("epsilon"), format=fmt)

    def to_json(self) -> dict[str, Any]:
        """The request body; keys left at their default are not sent."""
        body: dict[str, Any] = {"sql": self.sql, "format": self.format}
        if self.mode is not None:
            body["mode"] = self.mode
        if self.epsilon is not None:
            body["epsilon"] = self.epsilon
        return body


@dataclass(frozen=True)
class DescribeRequest:
    """``POST api/describe``: the schema ``sql`` would return, without reading data."""

    sql: str

    FIELDS: ClassVar[dict[str, tuple[type, ...]]] = {"sql": (str,)}

    @classmethod
    def from_body(cls, body: bytes) -> "DescribeRequest":
        data = _parse_object(body)
        _fields(data, cls.FIELDS, required=("sql",))
        return cls(sql=data["sql"])

    def to_json(self) -> dict[str, Any]:
        return {"sql": self.sql}


# ---- values on the wire ------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """A JSON-safe form of one cell or summary value (NaN and infinities become null)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


def encode_summary(summary: dict[str, Any]) -> bytes:
    """The summary as stored under ``SUMMARY_METADATA_KEY`` (UTF-8 JSON)."""
    return json.dumps(jsonable(summary), ensure_ascii=False).encode("utf-8")


def summary_header(summary: dict[str, Any]) -> str:
    """The summary as sent in ``SUMMARY_HEADER`` (ASCII JSON: headers are Latin-1)."""
    return json.dumps(jsonable(summary), ensure_ascii=True)


def decode_summary(raw: bytes | None) -> dict[str, Any]:
    return json.loads(raw.decode("utf-8")) if raw else {}


# ---- the cells table (per-cell status and accuracy) ------------------------------------------

def cells_table(rows: int, columns: list[tuple[str, Any, Any, Any, str]]) -> Any:
    """Build the cells table: ``columns`` is ``[(answer column, status, low, high,
    accuracy kind)]``, each array of ``rows`` values (Arrow arrays or sequences)."""
    import pyarrow as pa

    fields, arrays = [], []
    for name, status, low, high, kind in columns:
        for part, values, typ in (("status", status, pa.string()), ("low", low, pa.float64()),
                                  ("high", high, pa.float64())):
            array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=typ,
                                                                                           from_pandas=True)
            if array.type != typ:
                array = array.cast(typ)
            if len(array) != rows:
                raise ValueError(f"cells column {name}:{part} has {len(array)} rows, the answer {rows}")
            fields.append(pa.field(f"{name}:{part}", typ, metadata={
                CELL_COLUMN_KEY: name.encode("utf-8"), CELL_PART_KEY: part.encode(),
                CELL_ACCURACY_KEY: kind.encode()}))
            arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def cells_by_column(cells: Any) -> dict[str, dict[str, Any]]:
    """``{answer column: {"status", "low", "high": Arrow arrays, "accuracy": kind}}``."""
    out: dict[str, dict[str, Any]] = {}
    if cells is None:
        return out
    for field, column in zip(cells.schema, cells.columns):
        meta = field.metadata or {}
        name = meta.get(CELL_COLUMN_KEY, b"").decode("utf-8")
        part = meta.get(CELL_PART_KEY, b"").decode()
        if not name or part not in CELL_PARTS:
            continue
        entry = out.setdefault(name, {"accuracy": meta.get(CELL_ACCURACY_KEY, b"").decode()})
        entry[part] = column
    return out


def encode_cells(cells: Any) -> bytes:
    import base64

    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, cells.schema) as writer:
        writer.write_table(cells)
    return base64.b64encode(sink.getvalue().to_pybytes())


def decode_cells(raw: bytes | None) -> Any:
    """The cells table from ``encode_cells``' bytes (None: no cells were sent)."""
    if not raw:
        return None
    import base64
    import binascii

    import pyarrow as pa

    try:
        with pa.ipc.open_stream(base64.b64decode(raw, validate=True)) as reader:
            return reader.read_all()
    except (binascii.Error, pa.ArrowInvalid) as e:
        raise ValueError(f"the answer's cells table is not readable: {e}") from None


def attach_cells(table: Any, cells: Any) -> Any:
    """``table`` with ``cells`` (or nothing, for None) in its schema metadata."""
    if cells is None:
        return table
    if cells.num_rows != table.num_rows:
        raise ValueError(f"the cells table has {cells.num_rows} rows, the answer {table.num_rows}")
    meta = dict(table.schema.metadata or {})
    meta[CELLS_METADATA_KEY] = encode_cells(cells)
    return table.replace_schema_metadata(meta)


def split_cells(table: Any) -> tuple[Any, Any]:
    """(the answer without the cells metadata, the cells table or None)."""
    meta = dict(table.schema.metadata or {})
    raw = meta.pop(CELLS_METADATA_KEY, None)
    if raw is None:
        return table, None
    cells = decode_cells(raw)
    if cells is not None and cells.num_rows != table.num_rows:
        raise ValueError(f"the cells table has {cells.num_rows} rows, the answer {table.num_rows}")
    return table.replace_schema_metadata(meta or None), cells


def cells_json(cells: Any) -> dict[str, Any] | None:
    """The cells table in a JSON answer: ``{"columns": [{name, column, part, accuracy}], "rows"}``."""
    if cells is None:
        return None
    columns = []
    for field in cells.schema:
        meta = field.metadata or {}
        columns.append({"name": field.name, "column": meta.get(CELL_COLUMN_KEY, b"").decode("utf-8"),
                        "part": meta.get(CELL_PART_KEY, b"").decode(),
                        "accuracy": meta.get(CELL_ACCURACY_KEY, b"").decode()})
    rows = [[jsonable(v) for v in row] for row in zip(*(c.to_pylist() for c in cells.columns))]
    return {"columns": columns, "rows": rows}
