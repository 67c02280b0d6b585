"""The guard service's answers on the wire: a protected table as one Arrow IPC stream
(the summary in its schema metadata) or as JSON, and the columns of a schema as the
client reads them. Part of the guard service (``sekisho.services.guard``); the formats
themselves are ``sekisho.protocol``'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ibis.expr.datatypes as dt
import pyarrow as pa

from sekisho.protocol import SUMMARY_METADATA_KEY, encode_summary, jsonable

def schema_json(schema: pa.Schema) -> list[dict[str, str]]:
    """Columns of an Arrow schema as ``[{name, type, arrow_type}]``.

    ``type`` is an ibis dtype string (parse with ``ibis.dtype``), ``arrow_type`` the Arrow one.
    """
    columns = []
    for field in schema:
        try:
            ibis_type = str(dt.dtype(field.type))
        except Exception:  # an Arrow type ibis does not map; the client falls back to arrow_type
            ibis_type = "unknown"
        columns.append({"name": field.name, "type": ibis_type, "arrow_type": str(field.type)})
    return columns


def arrow_stream(table: pa.Table, summary: dict[str, Any]) -> bytes:
    """The protected table as one Arrow IPC stream, the summary in its schema metadata.

    Written straight from the guard's table (its record batches as they are: metadata is
    replaced without copying the columns), so the only copies are the stream itself and
    the bytes handed to the HTTP server."""
    meta = dict(table.schema.metadata or {})
    meta[SUMMARY_METADATA_KEY] = encode_summary(summary)
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def json_result(table: pa.Table, summary: dict[str, Any]) -> dict[str, Any]:
    rows = [[jsonable(v) for v in row.values()] for row in table.to_pylist()]
    return {"columns": schema_json(table.schema), "rows": rows, "summary": jsonable(summary)}


class EncodingFailed(Exception):
    """Encoding an answer failed (a bug: the answer was already audited, as ``seq``)."""

    def __init__(self, seq: Any):
        super().__init__(f"encoding the answer of audit seq {seq} failed")
        self.seq = seq


@dataclass(frozen=True)
class Encoded:
    """An answer ready for the wire: body, content type, and the summary header (Arrow only)."""

    body: bytes
    content_type: str
    summary_header: str | None = None
