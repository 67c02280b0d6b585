"""The analysts' JupyterLab defaults name real settings with valid values, and the
Japanese language pack they select is installed."""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from sekisho.resources import resource_dir

OVERRIDES = resource_dir("extensions") / "jupyterlab" / "overrides.d" / "sekisho.json"
SCHEMAS = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
JSON_TYPES = {"string": str, "boolean": bool, "number": (int, float), "integer": int}


def load_schema(plugin_id: str) -> dict:
    package, plugin = plugin_id.split(":")
    path = SCHEMAS / package / f"{plugin}.json"
    assert path.exists(), f"JupyterLab has no settings schema for {plugin_id}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("plugin_id", sorted(json.loads(OVERRIDES.read_text())))
def test_each_override_is_a_real_setting_with_a_valid_value(plugin_id: str) -> None:
    schema = load_schema(plugin_id)
    for key, value in json.loads(OVERRIDES.read_text())[plugin_id].items():
        spec = schema["properties"].get(key)
        assert spec is not None, f"{plugin_id} has no setting {key!r}"
        if "enum" in spec:
            assert value in spec["enum"], f"{plugin_id}.{key}={value!r} not in {spec['enum']}"
        elif "type" in spec:
            assert isinstance(value, JSON_TYPES[spec["type"]]), f"{plugin_id}.{key} has the wrong type"


def test_nothing_is_fetched_from_the_internet_and_the_ui_is_japanese() -> None:
    overrides = json.loads(OVERRIDES.read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["checkForUpdates"] is False
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert overrides["@jupyterlab/extensionmanager-extension:plugin"]["enabled"] is False
    assert overrides["@jupyterlab/translation-extension:plugin"]["locale"] == "ja_JP"
    try:
        distribution("jupyterlab-language-pack-ja-JP")
    except PackageNotFoundError:
        pytest.fail("the ja_JP locale needs jupyterlab-language-pack-ja-JP installed")
