"""Locate the project's data directories (policies, reports, hub, kernels, extensions).

In a source checkout they sit beside the package; in an installed wheel they are
shipped under ``sekisho/_data`` (see ``pyproject.toml``).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_KNOWN = ("policies", "reports", "hub", "kernels", "extensions")


def resource_dir(name: str) -> Path:
    """Return the directory holding the project's ``name`` resources."""
    if name not in _KNOWN:
        raise ValueError(f"unknown resource directory {name!r}; expected one of {_KNOWN}")
    for candidate in (_PACKAGE_DIR.parent / name, _PACKAGE_DIR / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"resource directory {name!r} not found beside {_PACKAGE_DIR}")
