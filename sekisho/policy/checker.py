"""Reading typed values out of the parsed YAML, with errors that name the key path.

Every check of the loader goes through a ``Checker``, so every problem becomes a
``PolicyError`` whose message names the file, the key path and the problem, e.g.
``policies/bad.yaml: views.resident_tax.columns.income_levy.bounds: lo (10) must be
below hi (5)``: a steward editing YAML finds the place without reading Python.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sekisho.errors import SekishoError
from sekisho.policy.model import file_keys


class PolicyError(SekishoError, ValueError):
    """The policy file is invalid. The message names file, key path and problem."""

    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        super().__init__(f"{file}: {key or '(top level)'}: {problem}")


class Checker:
    """Reads typed values from the parsed YAML, naming the key path on every problem."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, key: str, problem: str) -> PolicyError:
        return PolicyError(self.file, key, problem)

    def mapping(self, node: Any, key: str, *, allowed: set[str] | None = None,
                required: set[str] = frozenset()) -> dict:
        if not isinstance(node, dict):
            raise self.fail(key, f"must be a mapping, got {describe(node)}")
        for k in node:
            if isinstance(k, bool):     # YAML 1.1 reads on/off/yes/no/y/n as true/false
                raise self.fail(key, f"keys must be strings, got {k!r} (quote a key such as 'on' or 'no')")
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, got {k!r}")
        if allowed is not None:
            unknown = sorted(set(node) - allowed)
            if unknown:
                raise self.fail(_join(key, unknown[0]),
                                f"unknown key (allowed: {', '.join(sorted(allowed))})")
        missing = sorted(required - set(node))
        if missing:
            raise self.fail(_join(key, missing[0]), "required key is missing")
        return node

    def section(self, node: Any, key: str, model: type, *, extra: set[str] = frozenset()) -> dict:
        """A mapping holding the keys of ``model`` (``file_keys``), plus ``extra``."""
        allowed, required = file_keys(model)
        return self.mapping(node, key, allowed=allowed | set(extra), required=required)

    def string(self, node: Any, key: str, *, choices: tuple | None = None,
               pattern: str | None = None) -> str:
        if not isinstance(node, str) or not node.strip():
            raise self.fail(key, f"must be a non-empty string, got {describe(node)}")
        if choices is not None and node not in choices:
            raise self.fail(key, f"{node!r} is not one of {', '.join(choices)}")
        if pattern is not None and not re.fullmatch(pattern, node):
            raise self.fail(key, f"{node!r} does not match {pattern}")
        return node

    def boolean(self, node: Any, key: str) -> bool:
        if not isinstance(node, bool):
            raise self.fail(key, f"must be true or false, got {describe(node)}")
        return node

    def integer(self, node: Any, key: str, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        if isinstance(node, bool) or not isinstance(node, int):
            raise self.fail(key, f"must be an integer, got {describe(node)}")
        if minimum is not None and node < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {node}")
        if maximum is not None and node > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {node}")
        return node

    def number(self, node: Any, key: str, *, positive: bool = False,
               maximum: float | None = None) -> float:
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise self.fail(key, f"must be a number, got {describe(node)}")
        if positive and not node > 0:
            raise self.fail(key, f"must be positive, got {node}")
        if maximum is not None and node > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {node}")
        return float(node)

    def string_list(self, node: Any, key: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(node, list):
            raise self.fail(key, f"must be a list, got {describe(node)}")
        if not node and not allow_empty:
            raise self.fail(key, "must not be empty")
        out = []
        for i, item in enumerate(node):
            out.append(self.string(item, f"{key}[{i}]"))
        if len(set(out)) != len(out):
            raise self.fail(key, "contains duplicates")
        return tuple(out)


def describe(node: Any) -> str:
    if node is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {node!r}", bool: f"{node}"}.get(
        type(node), f"{type(node).__name__} {node!r}")


def _join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)
