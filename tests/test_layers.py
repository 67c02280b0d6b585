"""The import layers of docs/ARCHITECTURE.md hold.

``lint-imports`` (import-linter) checks the contract in ``pyproject.toml``
(``[tool.importlinter]``): cli above hub above services above reports above client above
guard above ingest/synth above store above the core modules, each core module above the
ones it uses, so there is no cycle and, for instance, the hub reaches the services only
through ``sekisho.access``. The contract is exhaustive (every top-level module of
``sekisho`` must be placed) and ignores no import.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def test_the_layers_contract_is_kept():
    # the CLI puts its working directory first on sys.path: it checks this checkout's
    # sekisho, whether or not the installed one is this checkout
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo", "--config", str(PYPROJECT)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert f"{len(contracts())} kept, 0 broken" in report, report


def test_the_contract_is_exhaustive_and_ignores_nothing():
    (layers,) = [c for c in contracts() if c["type"] == "layers"]
    assert layers.get("exhaustive") is True
    for contract in contracts():
        assert not contract.get("ignore_imports"), contract["name"]
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    for core in ("instance", "audit", "state", "policy", "access", "protocol", "errors"):
        assert core in placed
