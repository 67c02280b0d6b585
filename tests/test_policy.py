"""The policy loader: the shipped Himeji policy loads, and every kind of mistake in a
policy file is refused with a message naming the file, the key path and the problem."""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from sekisho.policy import PolicyError, load_policy
from sekisho.resources import resource_dir

HIMEJI = resource_dir("policies") / "himeji.yaml"


@pytest.fixture(scope="module")
def himeji_doc() -> dict:
    return yaml.safe_load(HIMEJI.read_text(encoding="utf-8"))


def test_himeji_policy_loads_with_the_agreed_settings():
    p = load_policy(HIMEJI)
    assert p.version.startswith("sha256:")
    assert set(p.views) == {"residents", "movements", "childcare", "resident_tax", "facilities", "areas"}
    assert p.disclosure.k == 10
    assert (p.disclosure.dominance.nk_n, p.disclosure.dominance.nk_k) == (2, 0.9)
    assert p.disclosure.dp.epsilon_per_query_max == 1.0 and p.disclosure.dp.budget_per_period == 10.0
    assert p.disclosure.dp.epsilon_per_query_min == 0.001
    assert p.roles["steward"].can_ingest and p.roles["steward"].views == ()
    assert p.roles["analyst"].modes == ("threshold", "dp") and p.roles["analyst"].default_mode == "threshold"
    assert p.roles["reports"].modes == ("threshold",)
    assert p.roles["admin"].can_review_audit and not p.roles["admin"].views
    assert p.roles["manager"].can_read_reports and not p.roles["manager"].views
    # issue 5: managers, analysts and admins read the published reports; stewards do not
    assert {r for r, role in p.roles.items() if role.can_read_reports} == {"manager", "analyst", "admin"}
    tax = p.views["resident_tax"].columns
    assert tax["income_levy"].cls == "sensitive_measure" and tax["income_levy"].bounds == (0, 20_000_000)
    assert tax["per_capita_levy"].bounds == (0, 10_000)
    assert p.views["residents"].privacy_unit == "person_id"
    assert p.views["facilities"].public and p.views["facilities"].privacy_unit is None
    assert p.purposes["residents"] and p.views["residents"].purpose == p.purposes["residents"]
    # the Himeji rule set
    res = p.sources["residents"].columns
    assert res["name"].rule == res["name_kana"].rule == res["banchi"].rule == res["address"].rule == "drop"
    assert res["atena_no"].rule == "keyed_id" and res["setai_no"].rule == "keyed_id"
    assert res["birth_date"].rule == "birth_topcoded" and res["birth_date"].params["top_age"] == 100
    assert res["gaiku"].rule == "locate"


def test_policy_objects_are_frozen():
    p = load_policy(HIMEJI)
    with pytest.raises(FrozenInstanceError):
        p.disclosure.k = 1  # type: ignore[misc]


def test_epsilon_minimum_is_optional(tmp_path, himeji_doc):
    doc = copy.deepcopy(himeji_doc)
    del doc["disclosure"]["dp"]["epsilon_per_query_min"]
    path = tmp_path / "no-min.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert load_policy(path).disclosure.dp.epsilon_per_query_min == 0.001


def _mutations():
    """(description, mutate(doc), expected key path, expected words in the problem)."""
    def set_(path, value):
        def f(doc):
            node = doc
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return f

    def delete(path):
        def f(doc):
            node = doc
            for part in path[:-1]:
                node = node[part]
            del node[path[-1]]
        return f

    return [
        ("k below 2", set_(["disclosure", "k"], 1), "disclosure.k", "must be >= 2"),
        ("k not an integer", set_(["disclosure", "k"], "ten"), "disclosure.k", "must be an integer"),
        ("epsilon cap not positive", set_(["disclosure", "dp", "epsilon_per_query_max"], 0),
         "disclosure.dp.epsilon_per_query_max", "must be positive"),
        ("epsilon minimum below the floor", set_(["disclosure", "dp", "epsilon_per_query_min"], 1e-300),
         "disclosure.dp.epsilon_per_query_min", "must be >="),
        ("epsilon minimum above the cap", set_(["disclosure", "dp", "epsilon_per_query_min"], 2.0),
         "disclosure.dp.epsilon_per_query_min", "exceeds epsilon_per_query_max"),
        ("epsilon minimum not a number", set_(["disclosure", "dp", "epsilon_per_query_min"], "0.01"),
         "disclosure.dp.epsilon_per_query_min", "must be a number"),
        ("epsilon cap infinite", set_(["disclosure", "dp", "epsilon_per_query_max"], float("inf")),
         "disclosure.dp.epsilon_per_query_max", "must be finite"),
        ("budget negative", set_(["disclosure", "dp", "budget_per_period"], -1),
         "disclosure.dp.budget_per_period", "must be positive"),
        ("bounds reversed", set_(["views", "resident_tax", "columns", "income_levy", "bounds"], [10, 5]),
         "views.resident_tax.columns.income_levy.bounds", "must be below"),
        ("measure without bounds", delete(["views", "facilities", "columns", "capacity_1", "bounds"]),
         "views.facilities.columns.capacity_1.bounds", "needs public bounds"),
        ("unknown class", set_(["views", "residents", "columns", "sex", "class"], "secret"),
         "views.residents.columns.sex.class", "is not one of"),
        ("empty domain", set_(["views", "residents", "columns", "sex", "domain"], []),
         "views.residents.columns.sex.domain", "non-empty"),
        ("domain of the wrong type", set_(["views", "residents", "columns", "age", "domain"], ["a"]),
         "views.residents.columns.age.domain[0]", "is not a integer"),
        ("role references a missing view", set_(["roles", "analyst", "views"], ["residents", "nope"]),
         "roles.analyst.views[1]", "unknown view 'nope'"),
        ("default mode not among modes", set_(["roles", "reports", "default_mode"], "dp"),
         "roles.reports.default_mode", "not among"),
        ("unknown mode", set_(["roles", "analyst", "modes"], ["threshold", "raw"]),
         "roles.analyst.modes[1]", "is not one of"),
        ("missing role", delete(["roles", "admin"]), "roles.admin", "required role is missing"),
        ("unknown rule", set_(["sources", "residents", "columns", "name", "rule"], "mask"),
         "sources.residents.columns.name.rule", "is not one of"),
        ("rule parameter missing", set_(["sources", "residents", "columns", "atena_no", "params"], {"as": "x"}),
         "sources.residents.columns.atena_no.params.namespace", "needs this parameter"),
        ("reference to an unknown column",
         set_(["sources", "movements", "references"],
              [{"columns": ["atena_no"], "source": "residents", "target": ["nope"]}]),
         "sources.movements.references[0].target", "'nope' is not declared"),
        ("unique names an unknown column", set_(["sources", "residents", "unique"], ["atena"]),
         "sources.residents.unique[0]", "not declared"),
        ("unknown top-level key", set_(["extra"], 1), "extra", "unknown key"),
        ("purpose missing", delete(["purposes", "childcare"]), "purposes.childcare", "利用目的"),
        ("public view holding a person", set_(["views", "residents", "public"], True),
         "views.residents.public", "person-level"),
        ("source column without a reason", delete(["sources", "resident_tax", "columns", "tax_year", "reason"]),
         "sources.resident_tax.columns.tax_year.reason", "required key is missing"),
    ]


@pytest.mark.parametrize("what, mutate, key, words", _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_policy_is_refused_naming_file_key_and_problem(tmp_path, himeji_doc, what, mutate, key, words):
    doc = copy.deepcopy(himeji_doc)
    mutate(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PolicyError) as exc:
        load_policy(bad)
    assert exc.value.key == key, str(exc.value)
    assert words in exc.value.problem, str(exc.value)
    assert str(bad) in str(exc.value) and key in str(exc.value)


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nviews: [\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"broken.yaml: \(top level\): invalid YAML: line \d+"):
        load_policy(bad)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


def test_version_changes_with_content(tmp_path, himeji_doc):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(himeji_doc, allow_unicode=True), encoding="utf-8")
    doc = copy.deepcopy(himeji_doc)
    doc["disclosure"]["k"] = 11
    b.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert load_policy(a).version != load_policy(b).version
    assert load_policy(b).disclosure.k == 11


def test_processing_standard_document_is_in_sync_with_the_policy():
    """docs/processing-standard.md is generated from the policy; regenerate it with
    `python -m sekisho.ingest.standard > docs/processing-standard.md` after a change."""
    from sekisho.ingest.standard import render

    doc = (Path(__file__).resolve().parent.parent / "docs" / "processing-standard.md").read_text(encoding="utf-8")
    p = load_policy(HIMEJI)
    assert doc == render(p)
    for src in p.sources.values():
        for col in src.columns.values():
            assert f"| `{col.name}` |" in doc and col.reason in doc
