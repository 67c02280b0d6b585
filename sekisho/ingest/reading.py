"""Reading the source export: open, digest, check the encoding, transcode, load.

Each source file is opened first (possibly as root, before privileges are dropped), then
read exactly once: the bytes are digested (sha256 for the audit record), checked against
the encoding and written as UTF-8 into a private working directory *outside* the instance.
DuckDB's CSV reader then loads that private copy, so the digest in the audit log is the
digest of exactly what was ingested (the original may change on disk meanwhile).
CP932 is transcoded with pyarrow's transcoding stream.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from sekisho.ingest.errors import IngestError, Problem
from sekisho.policy import Policy, Source

CHUNK = 4 << 20
ENCODINGS = ("auto", "utf-8", "cp932")
WORKDIR_PREFIX = "sekisho-ingest-"


@dataclass
class SourceFile:
    source: Source
    path: Path
    handle: BinaryIO
    sha256: str = ""
    size: int = 0
    encoding: str = ""          # the encoding actually used
    detected: bool = False      # chosen by --encoding auto
    copy: Path | None = None    # private UTF-8 copy
    header: list[str] = field(default_factory=list)
    rows: int = 0

    @property
    def name(self) -> str:
        return self.source.file


def open_sources(source_dir: Path, policy: Policy) -> dict[str, SourceFile]:
    """Open every file the policy names; a missing or unreadable file is a problem."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise IngestError(Problem(str(source_dir), None, None, "not a directory"))
    problems, files = [], {}
    for name, src in policy.sources.items():
        path = source_dir / src.file
        try:
            files[name] = SourceFile(source=src, path=path, handle=open(path, "rb"))
        except FileNotFoundError:
            problems.append(Problem(src.file, None, None,
                                    f"file is missing from {source_dir} ({src.title_ja})"))
        except OSError as exc:
            problems.append(Problem(src.file, None, None, f"cannot be read ({exc.strerror})"))
    if problems:
        close_sources(files)
        raise IngestError(problems, summary="source files missing")
    return files


def ignored_files(source_dir: Path, policy: Policy) -> list[str]:
    """CSV files in the export directory that the policy does not name (not read)."""
    known = {s.file for s in policy.sources.values()}
    return sorted(p.name for p in Path(source_dir).glob("*.csv") if p.name not in known)


def close_sources(files: dict[str, SourceFile]) -> None:
    for f in files.values():
        try:
            f.handle.close()
        except OSError:
            pass


# ---- private working directory --------------------------------------------------


def make_workdir() -> Path:
    """A private (0700) directory outside the instance for transcoded copies and DuckDB
    spill files. Removed when the ingest ends; a killed ingest's leftover is removed by
    the next one (its name carries the dead process id)."""
    remove_stale_workdirs()
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))


def remove_stale_workdirs() -> None:
    base = Path(tempfile.gettempdir())
    me = os.geteuid()
    for d in base.glob(WORKDIR_PREFIX + "*"):
        try:
            pid = int(d.name[len(WORKDIR_PREFIX):].split("-")[0])
            if d.stat().st_uid != me or _alive(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- digest, encoding, transcoding ------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Wraps the source handle so pyarrow's transcoding stream digests what it reads."""

    def __init__(self, handle: BinaryIO, digest):
        self.handle, self.digest, self.size = handle, digest, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.handle.read(len(b))
        n = len(data)
        b[:n] = data
        self.digest.update(data)
        self.size += n
        return n


def _locate(handle: BinaryIO, encoding: str) -> tuple[int, int, int] | None:
    """(line, byte offset, bad byte) of the first undecodable byte, or None."""
    handle.seek(0)
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset, lines = 0, 1
    while True:
        chunk = handle.read(CHUNK)
        final = not chunk
        try:
            decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            # the decoder may hold back up to a few bytes of a multibyte sequence
            pos = max(0, exc.start - (len(exc.object) - len(chunk)))
            pos = min(pos, len(chunk))
            bad = chunk[pos] if pos < len(chunk) else 0
            return lines + chunk[:pos].count(b"\n"), offset + pos, bad
        if final:
            return None
        lines += chunk.count(b"\n")
        offset += len(chunk)


def _copy_utf8(sf: SourceFile, out: Path) -> bool:
    """Copy validating strict UTF-8 (BOM dropped). False if the bytes are not UTF-8."""
    sf.handle.seek(0)
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size, first = 0, True
    with open(out, "wb") as dst:
        while True:
            chunk = sf.handle.read(CHUNK)
            digest.update(chunk)
            size += len(chunk)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                return False
            if not chunk:
                break
            if first and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8):]
            first = False
            dst.write(chunk)
    sf.sha256, sf.size = digest.hexdigest(), size
    return True


def _copy_cp932(sf: SourceFile, out: Path) -> bool:
    sf.handle.seek(0)
    digest = hashlib.sha256()
    reader = _HashingReader(sf.handle, digest)
    stream = pa.transcoding_input_stream(pa.PythonFile(reader, mode="r"), "cp932", "utf-8")
    try:
        with open(out, "wb") as dst:
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                dst.write(data)
    except UnicodeDecodeError:
        return False
    sf.sha256, sf.size = digest.hexdigest(), reader.size
    return True


def transcode(sf: SourceFile, workdir: Path, encoding: str) -> None:
    """Digest and copy ``sf`` into ``workdir`` as UTF-8, per --encoding."""
    if encoding not in ENCODINGS:
        raise IngestError(Problem(sf.name, None, None,
                                  f"unknown encoding {encoding!r} (use {', '.join(ENCODINGS)})"))
    out = workdir / (sf.source.name + ".utf8.csv")
    sf.copy = out
    if encoding in ("utf-8", "auto") and _copy_utf8(sf, out):
        sf.encoding, sf.detected = "utf-8", encoding == "auto"
        return
    if encoding == "utf-8":
        line, offset, bad = _locate(sf.handle, "utf-8")
        raise IngestError(Problem(
            sf.name, line, None,
            f"not valid UTF-8 (byte 0x{bad:02x} at offset {offset}); if the file is Shift_JIS/CP932, "
            "use --encoding cp932 or --encoding auto / UTF-8 ではありません。CP932 の場合は "
            "--encoding cp932 を指定してください"))
    if _copy_cp932(sf, out):
        sf.encoding, sf.detected = "cp932", encoding == "auto"
        return
    where = _locate(sf.handle, "cp932")
    line, offset, bad = where if where else (None, 0, 0)
    tried = "neither UTF-8 nor CP932" if encoding == "auto" else "not valid CP932"
    raise IngestError(Problem(sf.name, line, None,
                              f"{tried} (byte 0x{bad:02x} at offset {offset}) / 文字コードを判別できません"))


# ---- header and load into DuckDB ------------------------------------------------------


def check_header(sf: SourceFile) -> list[Problem]:
    """Every declared column must be present, nothing undeclared, no duplicates."""
    with open(sf.copy, encoding="utf-8", newline="") as f:
        first = f.readline()
    if not first.strip():
        return [Problem(sf.name, 1, None, "the file is empty (no header row)")]
    try:
        header = next(csv.reader([first]))
    except csv.Error as exc:
        return [Problem(sf.name, 1, None, f"the header row is not valid CSV ({exc})")]
    header = [h.strip() for h in header]
    sf.header = header
    problems = []
    seen = set()
    for h in header:
        if h in seen:
            problems.append(Problem(sf.name, 1, h, "column appears twice in the header"))
        seen.add(h)
    declared = sf.source.columns
    for h in header:
        if h not in declared:
            problems.append(Problem(sf.name, 1, h, "unknown column (not declared in the policy) / "
                                                   "ポリシーにない列です"))
    for c in declared:
        if c not in seen:
            problems.append(Problem(sf.name, 1, c, "column is missing from the header / 列がありません"))
    return problems


_REJECT_TEXT = {
    "MISSING COLUMNS": "too few fields on this line",
    "TOO MANY COLUMNS": "too many fields on this line",
    "UNQUOTED VALUE": "malformed quoting (unterminated or stray quote)",
    "LINE SIZE OVER MAXIMUM": "line is too long",
    "INVALID UNICODE": "invalid characters",
}


def load_raw(con, sf: SourceFile) -> list[Problem]:
    """Load the private UTF-8 copy as ``raw_<source>`` (all VARCHAR, empty = NULL).
    Malformed lines are reported with their line numbers."""
    name = sf.source.name
    cols = ", ".join(f"'{_q(h)}': 'VARCHAR'" for h in sf.header)
    con.execute(f"""
        CREATE TABLE raw_{name} AS SELECT * FROM read_csv('{_q(str(sf.copy))}',
            header = true, auto_detect = false, columns = {{{cols}}},
            delim = ',', quote = '"', escape = '"', null_padding = false,
            store_rejects = true, rejects_table = 'rej_{name}', rejects_scan = 'rejscan_{name}')
    """)
    rejects = con.execute(f"""
        SELECT line, column_name, error_type, count(*) OVER () AS n
        FROM rej_{name} ORDER BY line LIMIT 10""").fetchall()
    problems = [Problem(sf.name, int(line), column,
                        _REJECT_TEXT.get(str(etype), f"malformed CSV ({etype})"))
                for line, column, etype, _ in rejects]
    if rejects:
        total = rejects[0][3]
        if total > len(rejects):
            problems.append(Problem(sf.name, None, None, f"{total - len(rejects)} more malformed line(s)"))
    sf.rows = con.execute(f"SELECT count(*) FROM raw_{name}").fetchone()[0]
    return problems


def _q(text: str) -> str:
    return text.replace("'", "''")
