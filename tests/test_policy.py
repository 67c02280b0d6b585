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
    # the view definitions (issue 16: views are built from the policy, not from code)
    assert p.views["movements"].source == "movements" and p.views["movements"].joins["person"].source == "residents"
    assert p.views["childcare"].sources == ("childcare_certifications", "residents", "childcare_facilities")
    assert p.views["residents"].record_key.record is None
    assert p.views["resident_tax"].record_key.record.column == "tax_year"
    assert p.views["areas"].one_row_per == ("chome_code",)
    assert {(s.name, c.name) for s in p.sources.values() for c in s.columns.values() if c.sets_extract_date} == {
        ("residents", "registered_date"), ("residents", "removed_date"),
        ("movements", "idou_date"), ("movements", "notified_date")}
    # the record keys' range is not a policy setting (the guard's KEY_RANGE)
    assert not hasattr(p.disclosure.perturbation, "key_range")


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
        ("key_range is no policy setting", set_(["disclosure", "perturbation", "key_range"], 256),
         "disclosure.perturbation.key_range", "unknown key"),
        ("two rules releasing one name",
         set_(["sources", "residents", "columns", "setai_no", "params"], {"as": "person_id", "namespace": "setai"}),
         "sources.residents.columns.setai_no", "releases 'person_id'"),
        ("position without its axis", set_(["sources", "address_master", "columns", "lat", "params"], {"axis": "north"}),
         "sources.address_master.columns.lat.params.axis", "is not one of"),
        ("an address master with two latitudes",
         set_(["sources", "address_master", "columns", "lon", "params"], {"axis": "latitude"}),
         "sources.address_master.columns.lon.params.axis", "latitude is already lat's axis"),
        ("an address master without a longitude", delete(["sources", "address_master", "columns", "lon"]),
         "sources.address_master.columns", "none has axis longitude"),
        ("locate without a reference to the master", set_(["sources", "residents", "references"], []),
         "sources.residents.columns.gaiku.params", "locate needs one reference from (chome_code, gaiku)"),
        ("locate carrying a column the master does not keep",
         set_(["sources", "residents", "columns", "gaiku", "params", "carry"], {"area_name": "lat"}),
         "sources.residents.columns.gaiku.params.carry.area_name", "not a kept code or text column"),
        ("extract date from a column that is no date",
         set_(["sources", "resident_tax", "columns", "tax_year", "sets_extract_date"], True),
         "sources.resident_tax.columns.tax_year.sets_extract_date", "only a date column"),
        # ---- view definitions
        ("unknown source of a view", set_(["views", "areas", "source"], "master"),
         "views.areas.source", "unknown source 'master'"),
        ("unknown derivation", set_(["views", "residents", "columns", "age_band", "derive"], "bnd"),
         "views.residents.columns.age_band.derive", "unknown derivation 'bnd'"),
        ("from a value no rule releases", set_(["views", "residents", "columns", "chome_code", "from"], "gaiku"),
         "views.residents.columns.chome_code.from", "rule 'locate', which releases area_name"),
        ("from a name that is not in the source", set_(["views", "residents", "columns", "block", "from"], "blok"),
         "views.residents.columns.block.from", "is not a value the rules of source residents release"),
        ("a column without from: takes its own name", delete(["views", "resident_tax", "columns", "sex", "from"]),
         "views.resident_tax.columns.sex", "without from:, the column's own name 'sex' is not a value"),
        ("from an unknown join", set_(["views", "movements", "columns", "sex", "from"], "people.sex"),
         "views.movements.columns.sex.from", "no join named 'people'"),
        ("both from and derive", set_(["views", "movements", "columns", "sex", "derive"], "is_empty"),
         "views.movements.columns.sex", "either from:"),
        ("derivation parameter missing", delete(["views", "movements", "columns", "age_band", "width"]),
         "views.movements.columns.age_band.width", "derivation 'band' needs this parameter"),
        ("derivation parameter unknown", set_(["views", "movements", "columns", "idou_year", "width"], 5),
         "views.movements.columns.idou_year.width", "unknown key"),
        ("YAML reads on: as true", set_(["views", "movements", "columns", "age", True], "idou_date"),
         "views.movements.columns.age", "quote a key such as 'on'"),
        ("type of the origin differs", set_(["views", "residents", "columns", "age", "type"], "string"),
         "views.residents.columns.age", "gives integer values, but the column is declared string"),
        ("format the origin does not guarantee", set_(["views", "movements", "columns", "idou_type", "format"], "YYYY-MM"),
         "views.movements.columns.idou_type.format", "does not guarantee YYYY-MM"),
        ("year of a value that is no month", set_(["views", "movements", "columns", "idou_year", "of"], "idou_type"),
         "views.movements.columns.idou_year.of", "needs a YYYY-MM month"),
        ("band top not a multiple of its width", set_(["views", "movements", "columns", "age_band", "top"], 98),
         "views.movements.columns.age_band.top", "multiple of width"),
        ("band labels outside the declared domain", set_(["views", "movements", "columns", "age_band", "width"], 10),
         "views.movements.columns.age_band.domain", "can give '0-9'"),
        ("age from a date that is no birth date",
         set_(["views", "childcare", "columns", "age", "born"], "person.registered_date"),
         "views.childcare.columns.age.born", "must be a birth date"),
        ("age at a column that is no date", set_(["views", "childcare", "columns", "age", "at"], "cert_type"),
         "views.childcare.columns.age.at", "must be a date column"),
        ("age at a day not in every year",
         set_(["views", "resident_tax", "columns", "age_band", "of"],
              {"derive": "age", "born": "person.birth_date", "at": {"year": "tax_year", "month": 2, "day": 29}}),
         "views.resident_tax.columns.age_band.of.at", "not a day of every year"),
        ("case value the tested column cannot take",
         set_(["views", "movements", "columns", "chome_code", "when"], {"idou_type": ["転出", "死去"]}),
         "views.movements.columns.chome_code.when.idou_type[1]", "'死去' is not a value idou_type can take"),
        ("case branches of different types",
         set_(["views", "movements", "columns", "chome_code", "else"], {"derive": "is_empty", "of": "to_chome_code"}),
         "views.movements.columns.chome_code.else", "gives boolean values, then: gives string"),
        ("join without a reference", set_(["views", "residents", "joins"], {"tax": "resident_tax"}),
         "views.residents.joins.tax", "declares no reference to resident_tax"),
        ("join on a column that is not kept", set_(["views", "residents", "joins"], {"geo": "address_master"}),
         "views.residents.joins.geo", "cannot join residents.gaiku to address_master.gaiku"),
        ("join whose target is not unique",
         set_(["sources", "childcare_facilities", "unique"], ["facility_id", "facility_name"]),
         "views.childcare.joins.facility", "must be the unique key of childcare_facilities"),
        ("privacy unit from a join", set_(["views", "movements", "columns", "person_id", "from"], "person.person_id"),
         "views.movements.columns.person_id", "of the view's own source"),
        ("person-level view without a record key", delete(["views", "movements", "record_key"]),
         "views.movements.record_key", "needs a record key"),
        ("record key that does not identify a record",
         set_(["views", "movements", "record_key"], {"record": "idou_type"}),
         "views.movements.record_key.record", "must identify a record"),
        ("one record key per person where a person has many records",
         set_(["views", "movements", "record_key"], "person"),
         "views.movements.record_key", "'person' needs one record per person"),
        ("record key on a public view", set_(["views", "facilities", "record_key"], "person"),
         "views.facilities.record_key", "holds no person"),
        ("record key from a column its rule drops", set_(["sources", "movements", "columns", "idou_id", "rule"], "drop"),
         "views.movements.record_key.record", "does not keep the exact value"),
        ("a person-level view merging records", set_(["views", "residents", "one_row_per"], ["chome_code"]),
         "views.residents.one_row_per", "only a public view"),
        ("a row identity naming no column of the view",
         set_(["views", "childcare", "unique_per_person"], ["cert_ym", "cert_month"]),
         "views.childcare.unique_per_person[1]", "'cert_month' is not a column of the view"),
        ("a row identity of a measure", set_(["views", "resident_tax", "unique_per_person"], ["income_levy"]),
         "views.resident_tax.unique_per_person[0]", "only dimension columns"),
        ("a row identity that is not a list", set_(["views", "childcare", "unique_per_person"], "cert_ym"),
         "views.childcare.unique_per_person", "must be a list"),
        ("an empty row identity", set_(["views", "childcare", "unique_per_person"], []),
         "views.childcare.unique_per_person", "must not be empty"),
        ("a row identity on a view of one record per person",
         set_(["views", "residents", "unique_per_person"], ["block"]),
         "views.residents.unique_per_person", "already gives one row per person"),
        ("a row identity on a public view", set_(["views", "facilities", "unique_per_person"], ["block"]),
         "views.facilities.unique_per_person", "holds no person"),
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


def test_section_keys_are_the_model_fields(tmp_path, himeji_doc):
    """The keys each section accepts come from its dataclass (written once): an unknown
    key is refused listing exactly the model's fields."""
    from dataclasses import fields

    from sekisho.policy import Perturbation, RecordKey

    for path, model in ((["disclosure", "perturbation"], Perturbation), (["views", "movements", "record_key"], RecordKey)):
        doc = copy.deepcopy(himeji_doc)
        node = doc
        for part in path:
            node = node[part]
        node["bogus"] = 1
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        with pytest.raises(PolicyError) as exc:
            load_policy(bad)
        assert exc.value.key == ".".join(path) + ".bogus"
        assert exc.value.problem == f"unknown key (allowed: {', '.join(sorted(f.name for f in fields(model)))})"


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
