"""Bands of sensitive measures and household totals, declared in the policy (issue 18
items 2 and 3): the loader refuses bad band schemes and totals naming the key path; the
band columns the ingest derives equal the bands computed straight from the raw synthetic
exports (a person's 所得割額, a household's total for the tax year that applies); a new
band needs only YAML; a value no class holds refuses the upload; the guard answers
GROUP BY and WHERE on band columns like any other public dimension."""

from __future__ import annotations

import copy
from collections import Counter
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from sekisho.ingest.rules import keyed_id
from sekisho.policy import BAND_OUTSIDE, PolicyError, load_policy
from sekisho.resources import resource_dir

HIMEJI = resource_dir("policies") / "himeji.yaml"


@pytest.fixture(scope="module")
def himeji_doc() -> dict:
    return yaml.safe_load(HIMEJI.read_text(encoding="utf-8"))


def _set(path, value):
    def mutate(doc):
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


def _classes(*classes):
    return _set(["bands", "levy_class", "classes"], list(classes))


def _column(view, name, spec):
    return _set(["views", view, "columns", name], spec)


LABELS = ["0", "1-48599", "48600-96999", "97000-168999", "169000-300999", "301000-396999", "397000+", "課税記録なし"]
BAND_COLUMN = {"type": "string", "class": "dimension", "description_ja": "x", "derive": "bands",
               "bands": "levy_class"}
LOADER_ERRORS = [
    ("unsorted classes", _classes({"label": "a", "from": 0, "below": 100}, {"label": "b", "from": 500, "below": 900},
                                  {"label": "c", "from": 100, "below": 500}),
     "bands.levy_class.classes[2].from", "not sorted"),
    ("overlapping classes", _classes({"label": "a", "from": 0, "below": 100}, {"label": "b", "from": 50}),
     "bands.levy_class.classes[1].from", "overlaps classes[0]"),
    ("two classes from the same edge", _classes({"label": "a", "from": 0, "below": 100}, {"label": "b", "from": 0}),
     "bands.levy_class.classes[1].from", "overlaps"),
    ("a gap between classes", _classes({"label": "a", "from": 0, "below": 100}, {"label": "b", "from": 200}),
     "bands.levy_class.classes[1].from", "gap"),
    ("an empty class", _classes({"label": "a", "from": 0, "below": 0}, {"label": "b", "from": 0}),
     "bands.levy_class.classes[0].below", "must be above from"),
    ("an open class before the last", _classes({"label": "a", "from": 0}, {"label": "b", "from": 100}),
     "bands.levy_class.classes[0].below", "only the last class may be open"),
    ("one class only", _classes({"label": "a", "from": 0}),
     "bands.levy_class.classes", "at least two classes"),
    ("a fractional edge of an integer measure", _classes({"label": "a", "from": 0, "below": 0.5}, {"label": "b", "from": 0.5}),
     "bands.levy_class.classes[0].below", "integers"),
    ("a label used twice", _classes({"label": "a", "from": 0, "below": 100}, {"label": "a", "from": 100}),
     "bands.levy_class.classes[1].label", "used twice"),
    ("missing repeats a label", _set(["bands", "levy_class", "missing"], "0"),
     "bands.levy_class.missing", "used twice"),
    ("the reserved label", _classes({"label": BAND_OUTSIDE, "from": 0, "below": 100}, {"label": "b", "from": 100}),
     "bands.levy_class.classes[0].label", "reserved"),
    ("an unknown key in a class", _classes({"label": "a", "from": 0, "upto": 100}, {"label": "b", "from": 100}),
     "bands.levy_class.classes[0].upto", "unknown key"),
    ("unknown measure: no such source", _set(["bands", "levy_class", "measure"], "tax.income_levy"),
     "bands.levy_class.measure", "unknown measure 'tax.income_levy'"),
    ("unknown measure: no such column", _set(["bands", "levy_class", "measure"], "resident_tax.income"),
     "bands.levy_class.measure", "unknown measure 'resident_tax.income'"),
    ("unknown measure: not source.column", _set(["bands", "levy_class", "measure"], "income_levy"),
     "bands.levy_class.measure", "unknown measure"),
    ("a measure that is no number", _set(["bands", "levy_class", "measure"], "residents.chome_name"),
     "bands.levy_class.measure", "is not a measure"),
    ("a column naming an unknown scheme", _column("resident_tax", "income_levy_band", {**BAND_COLUMN, "bands": "levy", "of": "income_levy"}),
     "views.resident_tax.columns.income_levy_band.bands", "unknown band scheme 'levy'"),
    ("bands of another measure", _column("resident_tax", "income_levy_band", {**BAND_COLUMN, "of": "taxable_income"}),
     "views.resident_tax.columns.income_levy_band.of", "classify resident_tax.income_levy"),
    ("bands of a dimension", _column("residents", "age_levy", {**BAND_COLUMN, "of": "age"}),
     "views.residents.columns.age_levy.of", "gives no measure"),
    ("a banded column with another domain", _column("resident_tax", "income_levy_band",
                                                    {**BAND_COLUMN, "of": "income_levy", "domain": LABELS[::-1]}),
     "views.resident_tax.columns.income_levy_band.domain", "scheme's labels in their order"),
    ("a banded column that is no dimension", _column("resident_tax", "income_levy_band",
                                                     {**BAND_COLUMN, "class": "sensitive_measure", "of": "income_levy"}),
     "views.resident_tax.columns.income_levy_band.class", "is a dimension"),
    ("a total that is not declared", _column("residents", "household_levy_band",
                                             {**BAND_COLUMN, "of": {"derive": "total", "total": "levy", "at": {}}}),
     "views.residents.columns.household_levy_band.of.total", "unknown total 'levy'"),
    ("a lookup missing a key", _column("residents", "household_levy_band",
                                       {**BAND_COLUMN, "of": {"derive": "total", "total": "household_levy",
                                                              "at": {"household": "setai_no"}}}),
     "views.residents.columns.household_levy_band.of.at.tax_year", "required key is missing"),
    ("a lookup with a key of another kind", _column("residents", "household_levy_band",
                                                    {**BAND_COLUMN, "of": {"derive": "total", "total": "household_levy",
                                                                           "at": {"household": "atena_no", "tax_year": {
                                                                               "derive": "year", "of": "registered_ym"}}}}),
     "views.residents.columns.household_levy_band.of.at.household", "namespace atena"),
    ("a lookup key that is dropped", _column("residents", "household_levy_band",
                                             {**BAND_COLUMN, "of": {"derive": "total", "total": "household_levy",
                                                                    "at": {"household": "banchi", "tax_year": 2026}}}),
     "views.residents.columns.household_levy_band.of.at.household", "rule 'drop'"),
    ("a total of a non-number", _set(["totals", "household_levy", "sum"], "atena_no"),
     "totals.household_levy.sum", "must be a integer or decimal column"),
    ("a total keyed by an unknown join", _set(["totals", "household_levy", "by"], {"household": "member.setai_no"}),
     "totals.household_levy.by.household", "no join named 'member' (totals.household_levy.joins"),
    ("a total without keys", _set(["totals", "household_levy", "by"], {}),
     "totals.household_levy.by", "at least one key"),
    ("a total of an unknown source", _set(["totals", "household_levy", "source"], "tax"),
     "totals.household_levy.source", "unknown source 'tax'"),
]


@pytest.mark.parametrize("what, mutate, key, words", LOADER_ERRORS, ids=[e[0] for e in LOADER_ERRORS])
def test_bad_bands_and_totals_are_refused_naming_the_key_path(tmp_path, himeji_doc, what, mutate, key, words):
    doc = copy.deepcopy(himeji_doc)
    mutate(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PolicyError) as exc:
        load_policy(bad)
    assert exc.value.key == key, str(exc.value)
    assert words in exc.value.problem, str(exc.value)
    assert str(bad) in str(exc.value)


def test_the_himeji_bands_are_public_ordered_dimensions():
    policy = load_policy(HIMEJI)
    scheme = policy.bands["levy_class"]
    assert scheme.measure == ("resident_tax", "income_levy")
    # the national 保育料 階層 boundaries of 所得割額
    assert [c.lo for c in scheme.classes] == [0, 1, 48_600, 97_000, 169_000, 301_000, 397_000]
    for view, column in (("resident_tax", "income_levy_band"), ("resident_tax", "household_levy_band"),
                         ("residents", "household_levy_band"), ("childcare", "household_levy_band"),
                         ("movements", "household_levy_band")):
        col = policy.views[view].columns[column]
        assert col.cls == "dimension" and col.domain == scheme.labels, (view, column)


# ---- the SQL units ----------------------------------------------------------------------------

def test_band_edges_and_the_september_switch():
    from sekisho.ingest.derivations import bands
    from sekisho.ingest.views import operand_sql

    scheme = load_policy(HIMEJI).bands["levy_class"]
    sql = bands({"of": None, "bands": scheme}, lambda op: "x")
    con = duckdb.connect(config={"memory_limit": "256MB", "threads": 1})
    got = dict(con.execute(f"SELECT x, {sql} FROM (VALUES (0), (1), (48599), (48600), (396999), (397000), "
                           f"(20000000), (-1), (NULL)) t(x)").fetchall())
    assert got == {0: "0", 1: "1-48599", 48599: "1-48599", 48600: "48600-96999", 396999: "301000-396999",
                   397000: "397000+", 20000000: "397000+", -1: BAND_OUTSIDE, None: "課税記録なし"}
    fee_year = load_policy(HIMEJI).views["childcare"].columns["fee_tax_year"].origin
    year = load_policy(HIMEJI).views["residents"].columns["household_levy_band"].origin.params["of"].params["at"][1][1]
    for extract, fee, tax in ((date(2026, 8, 31), 2025, 2026), (date(2026, 9, 30), 2026, 2026),
                              (date(2027, 3, 31), 2026, 2027), (date(2027, 4, 30), 2026, 2027)):
        assert con.execute(f"SELECT {operand_sql(fee_year, extract)}").fetchone()[0] == fee, extract
        assert con.execute(f"SELECT {operand_sql(year, extract)}").fetchone()[0] == tax, extract


# ---- derived columns against the raw synthetic exports ---------------------------------------

def classify(scheme, value) -> str | None:
    if value is None or pd.isna(value):
        return scheme.missing
    for cls in scheme.classes:
        if value >= cls.lo and (cls.hi is None or value < cls.hi):
            return cls.label
    return BAND_OUTSIDE


@pytest.fixture(scope="module")
def city(ingested_instance):
    """The store tables and the raw exports of the shared synthetic city, persons keyed."""
    from sekisho.store import Store

    inst = ingested_instance.instance
    store = Store(inst)
    path = store.snapshots_dir / store.current_id() / "data.duckdb"
    with duckdb.connect(str(path), read_only=True, config={"memory_limit": "512MB", "threads": 1}) as con:
        tables = {name: con.execute(f"SELECT * FROM {name}").df()
                  for name in ("residents", "resident_tax", "childcare", "movements")}
    src = ingested_instance.source_dir
    raw = {name: pd.read_csv(src / f"{name}.csv", dtype=str, keep_default_na=False)
           for name in ("residents", "resident_tax", "childcare_certifications", "movements")}
    secret = inst.secret
    pid = {a: keyed_id(secret, "atena", a) for a in raw["residents"].atena_no}
    tax = raw["resident_tax"].assign(tax_year=lambda d: d.tax_year.astype(int),
                                     income_levy=lambda d: d.income_levy.astype(int))
    tax = tax.merge(raw["residents"][["atena_no", "setai_no"]], on="atena_no", how="left")
    household = tax.groupby(["setai_no", "tax_year"]).income_levy.sum().to_dict()
    extract = date.fromisoformat(ingested_instance.result.extract_date)
    return {"tables": tables, "raw": raw, "pid": pid, "tax": tax, "household": household,
            "extract": extract, "scheme": load_policy(inst.policy_path).bands["levy_class"]}


def test_person_and_household_bands_on_resident_tax(city):
    scheme, tax = city["scheme"], city["tax"]
    truth = Counter((city["pid"][r.atena_no], r.tax_year, classify(scheme, r.income_levy),
                     classify(scheme, city["household"].get((r.setai_no, r.tax_year))))
                    for r in tax.itertuples())
    got = Counter(city["tables"]["resident_tax"][["person_id", "tax_year", "income_levy_band",
                                                  "household_levy_band"]].itertuples(index=False, name=None))
    assert got == truth
    # not a constant: several classes are used, and a household's band can exceed a member's own
    assert len({band for _, _, band, _ in truth}) >= 5
    assert any(own != hh for _, _, own, hh in truth)


def test_household_band_of_residents_uses_the_tax_year_of_the_extract_month(city):
    scheme, year = city["scheme"], city["extract"].year
    raw = city["raw"]["residents"]
    truth = Counter((city["pid"][r.atena_no], classify(scheme, city["household"].get((r.setai_no, year))))
                    for r in raw.itertuples())
    got = Counter(city["tables"]["residents"][["person_id", "household_levy_band"]].itertuples(index=False, name=None))
    assert got == truth
    assert Counter(band for _, band in truth)[scheme.missing] < 0.5 * len(raw)


def test_household_band_of_children_uses_the_fee_year_switching_in_september(city):
    scheme, extract = city["scheme"], city["extract"]
    fee_year = extract.year if extract.month >= 9 else extract.year - 1
    setai = dict(zip(city["raw"]["residents"].atena_no, city["raw"]["residents"].setai_no))
    certs = city["raw"]["childcare_certifications"]
    truth = Counter((city["pid"][r.atena_no], r.cert_type, r.valid_from[:7],
                     classify(scheme, city["household"].get((setai[r.atena_no], fee_year))))
                    for r in certs.itertuples())
    table = city["tables"]["childcare"]
    got = Counter(table[["person_id", "cert_type", "valid_from_ym", "household_levy_band"]]
                  .itertuples(index=False, name=None))
    assert got == truth and len(truth) > 50
    assert set(table.fee_tax_year) == {fee_year}


def test_household_band_of_movements_uses_the_household_and_year_of_the_event(city):
    scheme = city["scheme"]
    moves = city["raw"]["movements"]
    truth = Counter((city["pid"][r.atena_no], r.idou_type, r.idou_date[:7],
                     classify(scheme, city["household"].get((r.setai_no, int(r.idou_date[:4])))))
                    for r in moves.itertuples())
    got = Counter(city["tables"]["movements"][["person_id", "idou_type", "idou_ym", "household_levy_band"]]
                  .itertuples(index=False, name=None))
    assert got == truth
    assert any(band not in (scheme.missing,) for _, kind, _, band in truth if kind == "転出")


# ---- policy is data: a new band needs no Python; fail closed ---------------------------------

def _instance_with(tmp_path: Path, doc: dict):
    from sekisho.instance import Instance
    from sekisho.state import set_role

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "himeji.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    load_policy(policies / "himeji.yaml")
    inst = Instance.create(tmp_path / "home", policy_dir=policies)
    set_role(inst, "stew", "steward")
    return inst


def test_a_new_band_is_only_yaml(tmp_path, himeji_doc):
    from ingest_fixtures import EXTRACT, write_mini_city
    from sekisho.ingest import ingest
    from sekisho.store import Store

    doc = copy.deepcopy(himeji_doc)
    doc["bands"]["income_class"] = {
        "title_ja": "課税標準額の階級", "measure": "resident_tax.taxable_income",
        "classes": [{"label": "200万円未満", "from": 0, "below": 2_000_000},
                    {"label": "200〜500万円", "from": 2_000_000, "below": 5_000_000},
                    {"label": "500万円以上", "from": 5_000_000}]}
    doc["views"]["resident_tax"]["columns"]["income_class"] = {
        "type": "string", "class": "dimension", "description_ja": "課税標準額の階級",
        "derive": "bands", "bands": "income_class", "of": "taxable_income"}
    inst = _instance_with(tmp_path, doc)
    data = write_mini_city(tmp_path / "export")
    ingest(inst, tmp_path / "export", user="stew", extract_date=EXTRACT)
    store = Store(inst)
    with duckdb.connect(str(store.snapshots_dir / store.current_id() / "data.duckdb"), read_only=True,
                        config={"memory_limit": "256MB", "threads": 1}) as con:
        got = Counter(r[0] for r in con.execute("SELECT income_class FROM resident_tax").fetchall())
    incomes = [int(r["taxable_income"]) for r in data["resident_tax.csv"]]
    truth = Counter("200万円未満" if v < 2_000_000 else "200〜500万円" if v < 5_000_000 else "500万円以上"
                    for v in incomes)
    assert got == truth and len(truth) == 3


def test_a_value_no_class_holds_refuses_the_upload(tmp_path, himeji_doc):
    from ingest_fixtures import EXTRACT, write_mini_city
    from sekisho.ingest import IngestError, ingest
    from sekisho.store import Store

    doc = copy.deepcopy(himeji_doc)
    doc["bands"]["levy_class"]["classes"] = [{"label": "high", "from": 400_000, "below": 600_000},
                                             {"label": "top", "from": 600_000}]
    inst = _instance_with(tmp_path, doc)
    write_mini_city(tmp_path / "export")
    with pytest.raises(IngestError) as exc:
        ingest(inst, tmp_path / "export", user="stew", extract_date=EXTRACT)
    text = " ".join(str(p) for p in exc.value.problems)
    assert "views.resident_tax.income_levy_band" in text and "domain" in text
    assert Store(inst).current() is None


# ---- through the guard: GROUP BY and WHERE on band columns -----------------------------------

def test_the_guard_groups_and_filters_by_band_columns(ingested_instance, city):
    from sekisho.guard import Guard

    policy = load_policy(ingested_instance.instance.policy_path)
    k, noise = policy.disclosure.k, policy.disclosure.perturbation.max_noise
    year = int(city["tax"].tax_year.max())
    low = ("0", "1-48599", "48600-96999")
    guard = Guard(ingested_instance.instance)
    try:
        result = guard.query(f"SELECT household_levy_band, COUNT(*) AS n FROM resident_tax WHERE tax_year = {year} "
                             f"AND income_levy_band IN ({', '.join(repr(v) for v in low)}) "
                             "GROUP BY household_levy_band", user=ingested_instance.analyst)
    finally:
        guard.close()
    from sekisho.protocol import cells_by_column

    got = {r["household_levy_band"]: r["n"] for r in result.table.to_pylist()}
    companion = cells_by_column(result.cells)["n"]
    stated = {r["household_levy_band"]: (st, lo, hi) for r, st, lo, hi in
              zip(result.table.to_pylist(), *(companion[c].to_pylist() for c in ("status", "low", "high")))}
    scheme, rows = city["scheme"], city["tax"][city["tax"].tax_year == year]
    truth = Counter(classify(scheme, city["household"].get((r.setai_no, year)))
                    for r in rows.itertuples() if classify(scheme, r.income_levy) in low)
    assert set(got) <= set(scheme.labels)
    checked = 0
    for label in scheme.labels:
        n = truth.get(label, 0)
        if got.get(label) is not None and stated[label][0] == "widened":
            # answered without conditions that change the cell by fewer than k (maybe
            # none; sekisho.guard.cell_widening): the count asked for within its interval
            assert stated[label][1] <= n <= stated[label][2], (label, got[label], n, stated[label])
        elif n < k:
            assert got.get(label) is None, (label, n)
        elif got.get(label) is None:
            # a cell an IN element changes by fewer than k (sekisho.guard.cell_influence)
            assert result.summary["cell_influence_checked"], (label, n)
        else:
            assert abs(got[label] - n) <= noise, (label, got[label], n)
            checked += 1
    assert checked >= 2


def test_band_columns_are_public_partitions_in_dp_mode(ingested_instance, city):
    """DP mode releases every band of the public domain (no partition selection), each
    within a bound computed from the mechanism: resident_tax has one row per person and
    tax year, so with the year fixed a person changes one count by one (sensitivity 1) and
    the discrete Laplace noise exceeds t with probability at most 2·exp(-t·ε)."""
    import math

    from sekisho.guard import Guard

    epsilon, cells = 0.5, len(city["scheme"].labels)
    tolerance = math.ceil(math.log(2 * cells / 1e-9) / epsilon)
    year = int(city["tax"].tax_year.max())
    guard = Guard(ingested_instance.instance)
    try:
        result = guard.query(f"SELECT income_levy_band, COUNT(*) AS n FROM resident_tax WHERE tax_year = {year} "
                             "GROUP BY income_levy_band", user=ingested_instance.analyst, mode="dp", epsilon=epsilon)
    finally:
        guard.close()
    got = {r["income_levy_band"]: r["n"] for r in result.table.to_pylist()}
    assert set(got) == set(city["scheme"].labels)
    rows = city["tax"][city["tax"].tax_year == year]
    truth = Counter(classify(city["scheme"], v) for v in rows.income_levy)
    for label in city["scheme"].labels:
        assert abs(got[label] - truth.get(label, 0)) <= tolerance, (label, got[label], truth.get(label, 0))
