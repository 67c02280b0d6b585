"""The six source-export CSV files (docs/ARCHITECTURE.md section 2) and how they are written.

Files are written incrementally, chunk by chunk, through pyarrow's CSV writer into a staging
directory; only when every file is complete are they moved into place and the manifest
written, so a failed run never leaves a half-written export behind.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

# file name -> columns, in the contract's order (docs/ARCHITECTURE.md section 2)
COLUMNS: dict[str, tuple[str, ...]] = {
    "residents.csv": (
        "atena_no", "setai_no", "name", "name_kana", "birth_date", "sex", "relationship",
        "chome_code", "chome_name", "gaiku", "banchi", "address", "registered_date",
        "removed_date", "removal_reason"),
    "address_master.csv": ("chome_code", "chome_name", "block", "gaiku", "lat", "lon"),
    "movements.csv": (
        "idou_id", "atena_no", "setai_no", "idou_type", "idou_date", "notified_date",
        "from_pref_code", "from_muni_code", "from_muni_name", "to_pref_code", "to_muni_code",
        "to_muni_name", "from_chome_code", "from_gaiku", "to_chome_code", "to_gaiku"),
    "childcare_facilities.csv": (
        "facility_id", "facility_name", "facility_type", "block", "chome_code",
        "capacity_1", "capacity_2", "capacity_3"),
    "childcare_certifications.csv": (
        "cert_no", "atena_no", "cert_type", "cert_date", "valid_from", "valid_to",
        "facility_id", "use_from", "use_to"),
    "resident_tax.csv": ("atena_no", "tax_year", "taxable_income", "income_levy", "per_capita_levy"),
}

ENCODINGS = ("utf-8", "cp932")
_WRITE_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="none")


class CsvSink:
    """Appends pyarrow tables to one CSV file in the chosen encoding, hashing as it goes."""

    def __init__(self, path: Path, columns: tuple[str, ...], encoding: str) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.path = path
        self.columns = columns
        self.encoding = encoding
        self.rows = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        self._emit((",".join(columns) + "\n").encode("utf-8"))

    def _emit(self, utf8: bytes) -> None:
        data = utf8 if self.encoding == "utf-8" else utf8.decode("utf-8").encode(self.encoding)
        self._hash.update(data)
        self._file.write(data)

    def write(self, table: pa.Table) -> None:
        if tuple(table.column_names) != self.columns:
            raise ValueError(f"{self.path.name}: columns {table.column_names} differ from the contract "
                             f"{list(self.columns)}")
        if table.num_rows == 0:
            return
        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer, _WRITE_OPTIONS)
        self._emit(buffer.getvalue())
        self.rows += table.num_rows

    def close(self) -> dict:
        self._file.close()
        return {"rows": self.rows, "sha256": self._hash.hexdigest(), "encoding": self.encoding}

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
