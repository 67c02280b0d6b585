"""One upload, end to end: authorize, open, read, validate, abstract, materialise, switch.

Every attempt is audited: ``ingest`` (outcome ok) on success, ``ingest.failed`` (outcome
``denied`` for a caller who is not a steward, ``failed`` for bad input or any other error)
otherwise. The store changes only at the very end (``SnapshotWriter.switch``), after the
``ingest`` audit entry is durable; anything earlier that fails leaves it untouched.

Raw values live only in this process's in-memory DuckDB database and in a private
working directory outside the instance (removed at the end; a killed run's leftover is
removed by the next run). Only view tables, built with exactly the policy's columns, are
written into the snapshot file.
"""

from __future__ import annotations

import calendar
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from sekisho.ingest import reading, rules, validate, views
from sekisho.ingest.errors import IngestError, IngestRefused, Problem
from sekisho.instance import Instance
from sekisho.policy import Policy, PolicyError, load_policy
from sekisho.state import role_of
from sekisho.store import Store


@dataclass
class IngestResult:
    snapshot_id: str
    tables: dict[str, int]
    files: list[dict[str, Any]]
    extract_date: str
    seconds: float
    audit_seq: int
    pruned: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _scrub(message: str) -> str:
    """Blank out quoted fragments of an unexpected error (an engine error may quote a
    value from the data; the audit log must not receive raw values)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)


class Ingestion:
    """An upload in three audited steps (the CLI drops privileges between open and run)."""

    def __init__(self, instance: Instance, *, user: str, operator: str | None = None,
                 encoding: str = "auto", extract_date: date | None = None,
                 progress: bool = False, log: Callable[[str], None] | None = None,
                 policy: Policy | None = None):
        self.instance = instance
        self.user, self.operator = user, operator
        self.encoding = encoding
        self.extract_date = extract_date
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.role = role_of(instance, user)
        self.policy = policy
        self.files: dict[str, reading.SourceFile] = {}
        self.source_dir: Path | None = None
        self.ignored: list[str] = []
        self.started = time.monotonic()

    # ---- audit helpers -----------------------------------------------------------
    def _who(self) -> dict[str, Any]:
        return {"operator": self.operator} if self.operator else {}

    def _fail(self, exc: BaseException, outcome: str = "failed") -> None:
        if isinstance(exc, IngestError):
            reason = exc.summary
            problems = [p.as_dict() for p in exc.problems[:50]]
        else:
            reason = f"{type(exc).__name__}: {_scrub(str(exc))}"
            problems = []
        rejected: dict[str, int] = {}
        for p in problems:
            rejected[p["file"]] = rejected.get(p["file"], 0) + int(p["count"])
        self.instance.audit.append(
            "ingest.failed", user=self.user, role=self.role, outcome=outcome,
            summary=f"upload refused: {reason}"[:500],
            details={**self._who(), "reason": (str(exc) if isinstance(exc, IngestError)
                                               else reason)[:4000], "problems": problems,
                     "source_dir": str(self.source_dir) if self.source_dir else None,
                     "files": self._file_details(rejected),
                     "policy_version": self.instance.policy_version,
                     "duration_s": round(time.monotonic() - self.started, 3)})

    def _file_details(self, rejected: dict[str, int] | None = None) -> list[dict[str, Any]]:
        rejected = rejected or {}
        return [{"file": f.name, "sha256": f.sha256 or None, "encoding": f.encoding or None,
                 "bytes": f.size, "rows": f.rows, "rows_rejected": rejected.get(f.name, 0),
                 "rows_accepted": max(f.rows - rejected.get(f.name, 0), 0)}
                for f in self.files.values()]

    # ---- step 1: who ---------------------------------------------------------------
    def authorize(self) -> None:
        try:
            if self.policy is None:
                self.policy = load_policy(self.instance.policy_path)
        except PolicyError as exc:
            self._fail(exc)
            raise
        role = self.policy.roles.get(self.role) if self.role else None
        if role is None or not role.can_ingest:
            why = (f"{self.user} is not a registered user" if self.role is None
                   else f"{self.user} has role {self.role}")
            exc = IngestRefused(f"only a steward may ingest data; {why} / "
                                "データの取込はデータ管理者(steward)のみ可能です")
            self._fail(exc, outcome="denied")
            raise exc

    # ---- step 2: open the files (before privileges are dropped) --------------------
    def open(self, source_dir: str | os.PathLike) -> None:
        self.source_dir = Path(source_dir).absolute()
        try:
            self.files = reading.open_sources(self.source_dir, self.policy)
        except IngestError as exc:
            self._fail(exc)
            raise
        self.ignored = reading.ignored_files(self.source_dir, self.policy)
        for name in self.ignored:
            self.log(f"{name}: not named by the policy, ignored / ポリシーにないファイルは取り込みません")

    # ---- step 3: the work ------------------------------------------------------------
    def run(self) -> IngestResult:
        if self.policy is None or not self.files:
            raise RuntimeError("authorize() and open() come before run()")
        workdir = None
        try:
            workdir = reading.make_workdir()
            result = self._run(workdir)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            reading.close_sources(self.files)
            if workdir is not None:
                import shutil
                shutil.rmtree(workdir, ignore_errors=True)
        return result

    def _steps(self):
        from tqdm import tqdm

        return tqdm(total=8, desc="ingest", unit="step", file=sys.stderr,
                    disable=not self.progress, leave=False)

    def _run(self, workdir: Path) -> IngestResult:
        import duckdb

        policy = self.policy
        # the store's memory limit and threads (config.yaml store.*): beyond it DuckDB spills
        limits = Store(self.instance).connection_settings
        con = duckdb.connect(":memory:", config={"temp_directory": str(workdir / "spill"),
                                                 "preserve_insertion_order": True, **limits})
        from sekisho.ingest.keys import DigestPool

        pool = DigestPool()     # its helper process starts while the files are read
        bar = self._steps()
        self.timings: dict[str, float] = {}
        clock = {"name": None, "wall": time.monotonic(), "cpu": time.process_time()}

        def phase(name: str | None) -> None:
            """Progress label, and wall/CPU seconds of each phase (for the audit record)."""
            now, cpu = time.monotonic(), time.process_time()
            if clock["name"]:
                self.timings[clock["name"]] = round(now - clock["wall"], 3)
                self.timings[clock["name"] + "_cpu"] = round(cpu - clock["cpu"], 3)
            clock.update(name=name, wall=now, cpu=cpu)
            if name:
                bar.set_postfix_str(name)

        try:
            # 1. digest, encoding, private UTF-8 copies, headers
            phase("reading")
            problems: list[Problem] = []
            for sf in self.files.values():
                reading.transcode(sf, workdir, self.encoding)
                self.log(f"{sf.name}: encoding {sf.encoding}"
                         + (" (detected)" if sf.detected else ""))
                problems += reading.check_header(sf)
            if problems:
                raise IngestError(problems, summary="the files do not match the policy's columns")
            bar.update()
            # 2. load (malformed lines reported with their numbers)
            phase("loading")
            for sf in self.files.values():
                problems += reading.load_raw(con, sf)
                sf.copy.unlink()   # the private copy is no longer needed
            if problems:
                raise IngestError(problems, summary="malformed CSV")
            bar.update()
            # 3. validate
            phase("validating")
            problems = validate.validate(con, self.files, policy)
            if problems:
                raise IngestError(problems, summary="invalid values")
            bar.update()
            extract = self.extract_date or self._infer_extract_date(con)
            # 4. keyed IDs and geocoding
            phase("keying")
            keyed = rules.build_keymaps(con, policy, self.instance.secret, pool)
            pool.close()
            # raw tables were read in file order (rowid = line - 2); from here on order is free
            con.execute("SET preserve_insertion_order = false")
            located = rules.build_geo(con, policy)
            bar.update()
            # 5. abstraction: one staging table per source, then raw tables are dropped
            phase("abstracting")
            for name, src in policy.sources.items():
                rules.stage(con, src, extract)
                con.execute(f"DROP TABLE raw_{name}")
            for ns in keyed:                # raw identifiers are no longer needed
                con.execute(f"DROP TABLE keymap_{ns}")
            bar.update()
            # 6. one table per view (after the totals some of them look up)
            phase("building views")
            for total in policy.totals.values():
                views.build_total(con, policy, total)
            problems = []
            for view in policy.views.values():
                problems += views.check_merged_rows(con, policy, view)
                views.build(con, policy, view, extract)
                problems += views.check_domains(con, policy, view)
                problems += views.check_unique_per_person(con, policy, view)
            if problems:
                raise IngestError(problems, summary="values outside what the policy declares for the views")
            person_unique = _person_unique(con, policy)
            for name in policy.sources:     # free memory before writing
                con.execute(f"DROP TABLE stg_{name}")
            for name in policy.totals:
                con.execute(f"DROP TABLE total_{name}")
            bar.update()
            # 7. write the snapshot, audit, switch
            phase("writing")
            store = Store(self.instance)
            with store.writer(policy_version=self.instance.policy_version, user=self.user) as w:
                w.attach(con, "snap")
                for name in policy.views:
                    views.write(con, f"view_{name}", f"snap.{name}")
                    con.execute(f"DROP TABLE view_{name}")
                con.execute("DETACH snap")
                bar.update()
                phase("sealing")
                info = w.prepare({"extract_date": extract.isoformat(), "policy": policy.version,
                                  "person_unique": person_unique})
                phase(None)
                seconds = round(time.monotonic() - self.started, 3)
                files = self._file_details()
                entry = self.instance.audit.append(
                    "ingest", user=self.user, role=self.role, outcome="ok",
                    summary=(f"snapshot {info.id}: "
                             + ", ".join(f"{t} {n}" for t, n in info.tables.items())),
                    details={**self._who(), "source_dir": str(self.source_dir), "files": files,
                             "ignored_files": self.ignored,
                             "policy_version": self.instance.policy_version,
                             "policy_digest": policy.version, "snapshot": info.id,
                             "tables": info.tables, "extract_date": extract.isoformat(),
                             "keyed_ids": keyed, "located_gaiku": located,
                             "encoding_option": self.encoding, "duration_s": seconds,
                             "phases_s": self.timings})
                w.switch()
            bar.update()
        finally:
            pool.close()
            bar.close()
            con.close()
        keep = int(policy.store.get("keep_snapshots", 3))
        try:
            pruned = store.prune(keep, user=self.user)
        except Exception as exc:  # the upload itself succeeded; old snapshots stay for next time
            self.log(f"warning: old snapshots were not pruned ({exc})")
            pruned = []
        return IngestResult(snapshot_id=info.id, tables=info.tables, files=files,
                            extract_date=extract.isoformat(), seconds=seconds,
                            audit_seq=entry["seq"], pruned=pruned, timings=self.timings)

    def _infer_extract_date(self, con) -> date:
        """The last day of the month of the latest date in the columns the policy marks
        ``sets_extract_date`` (others, such as validity periods, may lie in the future)."""
        parts = [f"SELECT max({rules.ident(c.name)}) AS d FROM raw_{src.name}"
                 for src in self.policy.sources.values() for c in src.columns.values()
                 if c.sets_extract_date]
        latest = con.execute(f"SELECT max(d) FROM ({' UNION ALL '.join(parts)})").fetchone()[0] \
            if parts else None
        if latest is None:
            return date.today()
        y, m = int(latest[:4]), int(latest[5:7])
        return date(y, m, calendar.monthrange(y, m)[1])


def ingest(instance: Instance, source_dir: str | os.PathLike, *, user: str,
           operator: str | None = None, encoding: str = "auto", extract_date: date | None = None,
           progress: bool = False, log: Callable[[str], None] | None = None) -> IngestResult:
    """Upload a source export as ``user`` (who must be a steward)."""
    job = Ingestion(instance, user=user, operator=operator, encoding=encoding,
                    extract_date=extract_date, progress=progress, log=log)
    job.authorize()
    job.open(source_dir)
    return job.run()


def _person_unique(con, policy) -> dict[str, bool]:
    """Per person-level view: one row per person or not. Recorded in the snapshot's
    metadata so the guard need not count the view at its first query on it (a COUNT
    DISTINCT of the privacy unit: 150-250 ms at 530k)."""
    out = {}
    for name, view in policy.views.items():
        unit = next((c.name for c in view.columns.values() if c.cls == "privacy_unit"), None)
        if unit is None or view.public:
            continue
        rows, persons = con.execute(f'SELECT COUNT(*), COUNT(DISTINCT "{unit}") FROM view_{name}').fetchone()
        out[name] = bool(rows == persons)
    return out
