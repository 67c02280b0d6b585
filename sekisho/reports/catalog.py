"""The report notebooks shipped with Sekisho and the items (sections) each holds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from sekisho.resources import resource_dir

_ITEM = re.compile(r"^##\s+(\d+)\.\s+(.+)$", re.M)


@dataclass(frozen=True)
class ReportNotebook:
    name: str                       # file stem, e.g. "01_人口"
    path: Path
    title: str                      # Japanese title
    items: tuple[tuple[int, str], ...]  # (number, heading) of each section


def _read(path: Path) -> ReportNotebook:
    nb = nbformat.read(path, as_version=4)
    title = nb.metadata.get("sekisho", {}).get("title") or path.stem
    items = tuple((int(n), h.strip()) for cell in nb.cells if cell.cell_type == "markdown"
                  for n, h in _ITEM.findall(cell.source))
    return ReportNotebook(path.stem, path, title, items)


def notebooks(directory: Path | None = None) -> list[ReportNotebook]:
    directory = directory or resource_dir("reports")
    return [_read(p) for p in sorted(directory.glob("*.ipynb"))]


def select(names: tuple[str, ...] | list[str], directory: Path | None = None) -> list[ReportNotebook]:
    """Notebooks named by stem (``01_人口``) or by number prefix (``01``); all when empty."""
    available = notebooks(directory)
    if not names:
        return available
    chosen = []
    for name in names:
        hits = [nb for nb in available if nb.name == name or nb.name.split("_", 1)[0] == name]
        if not hits:
            known = ", ".join(nb.name for nb in available)
            raise KeyError(f"no report notebook {name!r}; available: {known}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def copy_notebooks(destination: str | Path = ".", *, overwrite: bool = False) -> list[Path]:
    """Copy the report notebooks into ``destination`` (an analyst's working directory), so
    they can be opened, changed and run in the analyst's own kernel. Existing files are kept
    unless ``overwrite``."""
    import shutil

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for nb in notebooks():
        target = destination / nb.path.name
        if target.exists() and not overwrite:
            continue
        shutil.copyfile(nb.path, target)
        copied.append(target)
    return copied
