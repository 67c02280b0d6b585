"""Publish the report notebooks: papermill -> nbconvert -> self-contained HTML, audited.

For each notebook (two at a time, in worker processes):

1. papermill executes it with the python3 kernel of this venv, with ``SEKISHO_HOME`` and
   ``SEKISHO_REPORTS_USER=reports`` in the environment, so every query goes through the
   guard as the ``reports`` identity in threshold mode; tables are saved as JSON/CSV into
   the new publication's ``tables/``;
2. nbconvert renders it without input cells; :mod:`sekisho.reports.html` wraps it into a
   page with plotly.js embedded once, and the page is refused if it would load anything
   from the network;
3. the publication is written into a fresh directory ``published/<name>/<id>/``; only
   after the ``publish`` audit entry is durable does the index (``published/index.json``)
   switch to it. A failure leaves the previous publication current and records
   ``publish.failed``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sekisho.access import REPORTS, REPORTS_USER
from sekisho.errors import SekishoError
from sekisho.instance import Instance, now_tokyo, secure, secure_tree
from sekisho.reports.catalog import ReportNotebook
from sekisho.reports.index import read_index, write_index
from sekisho.reports.periods import check_month, label_ja
from sekisho.state import role_of, set_role
from sekisho.store import Store

KERNEL = "python3"
KEEP_PUBLICATIONS = 2  # current + previous, per report


class PublishError(SekishoError):
    """A publication cannot be made (no data, the identity ``reports`` misassigned, ...)."""


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    title: str = ""
    digest: str = ""
    error: str = ""
    publication: str = ""
    tables: list[str] = field(default_factory=list)


def _snapshot(instance: Instance):
    current = Store(instance).current()
    if current is None:
        raise PublishError("the store has no snapshot yet (run `sekisho ingest` first) "
                           "/ データが取り込まれていません")
    return current


def _ensure_reports_identity(instance: Instance) -> None:
    role = role_of(instance, REPORTS_USER)
    if role is None:
        set_role(instance, REPORTS_USER, REPORTS)
        instance.audit.append("users.add", user="system", role=None, outcome="ok",
                              summary="registered the report service identity 'reports'",
                              details={"name": REPORTS_USER, "role": REPORTS})
    elif role != REPORTS:
        raise PublishError(f"user {REPORTS_USER!r} has role {role!r}, expected {REPORTS!r}")


def _publishing_environment(instance: Instance, scratch: Path) -> dict[str, str]:
    env = {
        "SEKISHO_HOME": str(instance.home),
        "SEKISHO_REPORTS_USER": REPORTS_USER,
        "SEKISHO_REPORTS_PUBLISH": "1",
        # the service account has no home directory: keep Jupyter's and IPython's files private
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "IPYTHONDIR": str(scratch / "ipython"),
        "MPLCONFIGDIR": str(scratch / "mpl"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    for key in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def resolve_base_month(instance: Instance, snapshot) -> str:
    """The data's reference month: the month of the snapshot's extract date (recorded by the
    ingest), else the latest month with 異動 as the guard reports it to ``reports``."""
    extract = (snapshot.details or {}).get("extract_date")
    if extract:
        return check_month(str(extract)[:7], "extract_date")
    import ibis

    from sekisho.reports.data import GuardConnection
    from sekisho.reports.notebook import latest_month

    connection = GuardConnection(ibis.sekisho.connect(home=str(instance.home), user=REPORTS_USER))
    try:
        return latest_month(connection.sql)
    finally:
        connection.backend.disconnect()


def render_one(notebook: ReportNotebook, parameters: dict[str, Any], target: Path,
               meta: list[tuple[str, str]]) -> Outcome:
    """Execute ``notebook`` into the (new, empty) directory ``target``. Runs in a worker."""
    import nbformat
    import papermill as pm

    from sekisho.reports.html import external_loads, notebook_body, page

    start = time.monotonic()
    target.mkdir(mode=0o700)
    tables = target / "tables"
    executed = target / "report.ipynb"
    try:
        pm.execute_notebook(str(notebook.path), str(executed),
                            parameters={**parameters, "tables_dir": str(tables)},
                            kernel_name=KERNEL, progress_bar=False, log_output=False,
                            request_save_on_cell_execute=False,
                            start_timeout=120, cwd=str(target))
        nb = nbformat.read(executed, as_version=4)
        html = page(title=notebook.title, meta=meta, body=notebook_body(nb))
        loads = external_loads(html)
        if loads:
            raise PublishError(f"{notebook.name}: the page would load from the network: {loads[:3]}")
        data = html.encode("utf-8")
        (target / "report.html").write_bytes(data)
        secure_tree(target)
        return Outcome(notebook.name, True, time.monotonic() - start, title=notebook.title,
                       digest="sha256:" + hashlib.sha256(data).hexdigest(),
                       tables=sorted(p.stem for p in tables.glob("*.json")))
    except Exception as exc:  # reported, recorded as publish.failed, never half-published
        detail = _failure_text(exc)
        return Outcome(notebook.name, False, time.monotonic() - start, title=notebook.title,
                       error=detail)


def _failure_text(exc: Exception) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


@contextmanager
def _publish_lock(published_dir: Path):
    path = published_dir / ".publish.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(instance: Instance, notebooks: list[ReportNotebook], *, caller: str,
            caller_role: str | None, base_month: str | None = None,
            compare_month: str | None = None, period: int = 5,
            area_level: str = "地域ブロック", workers: int = 2,
            progress: Callable[[Outcome, int, int], None] | None = None) -> list[Outcome]:
    """Publish ``notebooks``; return one :class:`Outcome` per notebook (failures included)."""
    published_dir = instance.published_dir
    published_dir.mkdir(mode=0o700, exist_ok=True)
    secure(published_dir)
    current = _snapshot(instance)
    snapshot = current.id
    _ensure_reports_identity(instance)
    scratch = Path(tempfile.mkdtemp(prefix="sekisho-publish-"))
    publishing_env = _publishing_environment(instance, scratch)
    saved_env = {key: os.environ.get(key) for key in publishing_env}
    os.environ.update(publishing_env)  # inherited by the workers and their kernels
    try:
        if base_month:
            check_month(base_month, "--base-month")
        else:
            base_month = resolve_base_month(instance, current)
        from sekisho.reports.periods import add_months

        compare_month = check_month(compare_month, "--compare-month") if compare_month else add_months(base_month, -12)
        parameters = {"base_month": base_month, "compare_month": compare_month,
                      "period": period, "area_level": area_level}
        stamp = now_tokyo()
        publication = stamp.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        meta = [("基準年月", label_ja(base_month)),
                ("公開日時", stamp.strftime("%Y-%m-%d %H:%M")),
                ("データ", snapshot)]
        with _publish_lock(published_dir):
            outcomes = _run(notebooks, parameters, published_dir, publication, meta, workers,
                            progress)
            _record(instance, outcomes, parameters, snapshot, caller, caller_role, stamp, publication)
        return outcomes
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)


def _run(notebooks, parameters, published_dir, publication, meta, workers, progress):
    outcomes: list[Outcome] = []
    jobs = {}
    log = Path(os.environ["JUPYTER_RUNTIME_DIR"]).parent / "kernels.log"
    with ProcessPoolExecutor(max_workers=max(1, workers), initializer=_quiet_worker,
                             initargs=(str(log),)) as pool:
        for nb in notebooks:
            report_dir = published_dir / nb.name
            report_dir.mkdir(mode=0o700, exist_ok=True)
            secure(report_dir)
            target = report_dir / f".{publication}.partial"
            jobs[pool.submit(render_one, nb, parameters, target, meta)] = (nb, target)
        for future in as_completed(jobs):
            nb, target = jobs[future]
            try:
                outcome = future.result()
            except Exception as exc:  # a worker died
                outcome = Outcome(nb.name, False, 0.0, title=nb.title, error=_failure_text(exc))
            outcome.publication = f"{nb.name}/{publication}"
            outcomes.append(outcome)
            if progress:
                progress(outcome, len(outcomes), len(notebooks))
    return sorted(outcomes, key=lambda o: o.name)


def _quiet_worker(log: str) -> None:
    """Kernels inherit the worker's stderr: send their start-up chatter to a log, not the
    terminal (failures are reported from papermill's exception instead)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def _record(instance, outcomes, parameters, snapshot, caller, caller_role, stamp, publication):
    """Audit each outcome; only an audited success becomes current (fail closed)."""
    published_dir = instance.published_dir
    index = read_index(published_dir)
    for o in outcomes:
        partial = published_dir / o.name / f".{publication}.partial"
        final = published_dir / o.publication
        details = {"report": o.name, "title": o.title, "parameters": parameters,
                   "snapshot": snapshot, "identity": REPORTS_USER, "seconds": round(o.seconds, 2)}
        if o.ok:
            try:
                os.replace(partial, final)
                instance.audit.append("publish", user=caller, role=caller_role, outcome="ok",
                                      summary=f"published {o.name} ({parameters['base_month']})",
                                      details={**details, "digest": o.digest,
                                               "publication": o.publication, "tables": o.tables})
            except Exception as exc:
                shutil.rmtree(final, ignore_errors=True)
                o.ok, o.error = False, _failure_text(exc)
            else:
                index["reports"][o.name] = {
                    "title": o.title, "base_month": parameters["base_month"],
                    "parameters": parameters, "published_at": stamp.isoformat(timespec="seconds"),
                    "published_by": caller, "snapshot": snapshot, "digest": o.digest,
                    "dir": o.publication, "tables": o.tables,
                }
                write_index(published_dir, index)
                _prune(published_dir / o.name, keep=o.publication.split("/")[1])
                continue
        shutil.rmtree(partial, ignore_errors=True)
        instance.audit.append("publish.failed", user=caller, role=caller_role, outcome="failed",
                              summary=f"publishing {o.name} failed", details={**details, "error": o.error})


def _prune(report_dir: Path, keep: str) -> None:
    """Keep the newest publications of one report (the index points at ``keep``)."""
    versions = sorted((p for p in report_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name, reverse=True)
    for old in versions[KEEP_PUBLICATIONS:]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
