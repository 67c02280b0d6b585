"""The index of published reports: ``published/index.json``.

The index is the pointer to each report's current publication: a publication is written
into its own directory first and the index is replaced atomically last, so a failed run
never replaces what readers see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sekisho.instance import secure

INDEX_NAME = "index.json"


def read_index(published_dir: Path) -> dict[str, Any]:
    path = Path(published_dir) / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"reports": {}}
    if not isinstance(data, dict) or not isinstance(data.get("reports"), dict):
        raise ValueError(f"{path}: not a Sekisho report index (missing 'reports' object)")
    return data


def write_index(published_dir: Path, index: dict[str, Any]) -> None:
    path = Path(published_dir) / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    secure(path)


def entries(published_dir: Path) -> list[dict[str, Any]]:
    """Published reports in catalogue order, each with its ``name``."""
    reports = read_index(published_dir)["reports"]
    return [{"name": name, **reports[name]} for name in sorted(reports)]


def report_file(published_dir: Path, name: str, relative: str = "report.html") -> Path | None:
    """The file ``relative`` of the current publication of ``name``, or None.

    Only names in the index resolve, and the result must stay inside the publication
    directory (no path tricks from a URL)."""
    entry = read_index(published_dir)["reports"].get(name)
    if not entry:
        return None
    root = (Path(published_dir) / entry["dir"]).resolve()
    target = (root / relative).resolve()
    if root != target and root not in target.parents:
        return None
    return target if target.is_file() else None
