"""A small published city for the report tests: synthetic exports -> ingest -> publish.

``published_city`` (session scope, registered in conftest.py) synthesises a small city
with ``sekisho synth``, ingests it as a steward and publishes all seven report notebooks
with the real guard. Tests compare what was published (the tables saved beside the HTML)
with figures computed straight from the raw CSV exports by :mod:`reports_reference`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from sekisho.instance import Instance
from sekisho.state import set_role

EXTRACT = date(2026, 10, 31)
PERSONS = 4000
SEED = 11


@dataclass
class PublishedCity:
    instance: Instance
    exports: Path
    extract: date
    outcomes: list

    def index(self) -> dict:
        return json.loads((self.instance.published_dir / "index.json").read_text(encoding="utf-8"))

    def table(self, key: str) -> tuple[pd.DataFrame, dict]:
        """A published table as a DataFrame (``None`` = suppressed) and its JSON."""
        for name, entry in self.index()["reports"].items():
            if key in entry["tables"]:
                path = self.instance.published_dir / entry["dir"] / "tables" / f"{key}.json"
                payload = json.loads(path.read_text(encoding="utf-8"))
                df = pd.DataFrame(payload["rows"], columns=payload["columns"], dtype=object)
                return df, payload
        raise KeyError(f"table {key} was not published")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sekisho.cli", *args], check=True,
                          capture_output=True, text=True)


def synthesise(exports: Path) -> None:
    cli("synth", "--out", str(exports), "--persons", str(PERSONS), "--seed", str(SEED))


def build_published_city(root: Path) -> PublishedCity:
    from sekisho.reports.catalog import notebooks
    from sekisho.reports.publish import publish

    exports, home = root / "exports", root / "home"
    synthesise(exports)
    instance = Instance.create(home)
    set_role(instance, "stew", "steward")
    from sekisho.ingest import ingest

    ingest(instance, exports, user="stew", extract_date=EXTRACT)
    outcomes = publish(instance, notebooks(), caller="pytest", caller_role=None, workers=2)
    failed = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, failed
    return PublishedCity(instance, exports, EXTRACT, outcomes)
