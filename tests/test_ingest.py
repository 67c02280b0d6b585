"""Ingest on a small hand-made export: what reaches the store, keyed IDs, bad input.

Bad input of every kind must be refused with the file, line and column named, and leave
the current snapshot, its contents and the audit chain exactly as they were.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest

from sekisho import policy as policy_module
from sekisho.ingest import IngestError, IngestRefused, ingest, rules
from sekisho.instance import Instance
from sekisho.state import set_role
from sekisho.store import Store

from ingest_fixtures import COLUMNS, EXTRACT, scan_store, write_mini_city


@pytest.fixture
def city(tmp_path):
    src = tmp_path / "export"
    data = write_mini_city(src)
    inst = Instance.create(tmp_path / "home")
    set_role(inst, "hanako", "steward")
    set_role(inst, "taro", "analyst")
    return inst, src, data


def _ingest(inst, src, **kw):
    return ingest(inst, src, user=kw.pop("user", "hanako"), extract_date=EXTRACT, **kw)


def store_state(inst: Instance) -> dict:
    """Everything an upload may not change when it fails."""
    store = Store(inst)
    files = {}
    for p in sorted(inst.store_dir.rglob("*")):
        if p.is_file() and p.name != "writer.lock":
            files[str(p.relative_to(inst.store_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    contents = {}
    if store.current_id():
        con = store.connect()
        for t in con.list_tables():
            contents[t] = con.table(t).to_pandas().sort_values(
                by=list(con.table(t).columns)).to_csv(index=False)
        con.disconnect()
    return {"current": store.current_id(), "files": files, "contents": contents,
            "audit": (inst.audit_dir / "audit.jsonl").read_bytes()}


def assert_unchanged(inst: Instance, before: dict, *, failure_type: str = "ingest.failed") -> dict:
    after = store_state(inst)
    assert after["current"] == before["current"]
    assert after["files"] == before["files"]
    assert after["contents"] == before["contents"]
    assert after["audit"].startswith(before["audit"]), "existing audit entries changed"
    assert inst.audit.verify().ok
    last = list(inst.audit.entries())[-1]
    assert last["type"] == failure_type
    return last


# ---- what reaches the store -------------------------------------------------------------


def test_ingest_builds_one_table_per_view_with_exactly_the_policy_columns(city):
    inst, src, data = city
    result = _ingest(inst, src)
    pol = policy_module.load_policy(inst.policy_path)
    con = Store(inst).connect()
    assert set(con.list_tables()) == set(pol.views)
    for name, view in pol.views.items():
        cols = list(con.table(name).columns)
        expected = list(view.columns) + ([] if view.public else ["_rkey"])
        assert cols == expected, name
    assert result.tables["residents"] == len(data["residents.csv"])
    assert result.tables["movements"] == len(data["movements.csv"])
    assert result.tables["resident_tax"] == len(data["resident_tax.csv"])
    rk = con.sql("SELECT min(_rkey) AS lo, max(_rkey) AS hi FROM movements").to_pandas().iloc[0]
    assert 0 <= rk.lo <= rk.hi <= 255


def test_record_keys_are_stored_uncompressed(city):
    """Every guarded query reads ``_rkey`` (views.write): it is the one column stored
    uncompressed; DuckDB still compresses the others."""
    inst, src, _ = city
    _ingest(inst, src)
    pol = policy_module.load_policy(inst.policy_path)
    con = Store(inst).connect().con
    personal = [name for name, view in pol.views.items() if not view.public]
    assert personal
    for name in personal:
        storage = con.execute(f"SELECT column_name, compression FROM pragma_storage_info('{name}') "
                              "WHERE segment_type <> 'VALIDITY'").fetchall()
        assert {c for col, c in storage if col == "_rkey"} == {"Uncompressed"}, name
        assert {c for col, c in storage if col != "_rkey"} - {"Uncompressed"}, name
    assert con.execute("SELECT typeof(any_value(_rkey)) FROM residents").fetchone() == ("SMALLINT",)


def test_raw_identifiers_and_precise_values_never_reach_the_store(city):
    inst, src, data = city
    _ingest(inst, src)
    needles = set()
    for r in data["residents.csv"]:
        needles |= {r["name"], r["name_kana"], r["banchi"], r["address"], r["birth_date"],
                    r["atena_no"], r["setai_no"]}
        needles |= set(r["name"].split()) - {""}
    found = scan_store(inst, needles)
    assert not found, f"raw values found in the store: {sorted(found)[:5]}"


def test_top_coding_and_month_precision(city):
    inst, src, data = city
    _ingest(inst, src)
    con = Store(inst).connect()
    res = con.table("residents").to_pandas()
    assert res.age.max() == 100
    oldest = res[res.age == 100]
    # born 1921-02: shown as the month that makes them exactly 100 at the extract date
    assert set(oldest.birth_ym) == {"1926-10"} and set(oldest.birth_year) == {1926}
    assert set(oldest.age_band) == {"100+"}
    assert res.birth_ym.str.fullmatch(r"\d{4}-\d{2}").all()
    assert res.registered_ym.str.fullmatch(r"\d{4}-\d{2}").all()
    mov = con.table("movements").to_pandas()
    assert mov.age.max() <= 100
    # mesh codes are JIS X 0410 strings computed from the 街区 point
    assert res.mesh1km.str.fullmatch(r"\d{8}").all()
    assert res.mesh500m.str.fullmatch(r"\d{9}").all()
    assert res.mesh250m.str.fullmatch(r"\d{10}").all()
    assert (res.mesh250m.str[:8] == res.mesh1km).all()


def test_movement_address_is_the_one_concerned(city):
    inst, src, data = city
    _ingest(inst, src)
    mov = Store(inst).connect().table("movements").to_pandas()
    raw = data["movements.csv"]
    out = [m for m in raw if m["idou_type"] == "転出"]
    assert out
    assert set(mov[mov.idou_type == "転出"].chome_code) == {m["from_chome_code"] for m in out}
    moves = [m for m in raw if m["idou_type"] == "転居"]
    assert set(mov[mov.idou_type == "転居"].chome_code) == {m["to_chome_code"] for m in moves}


# ---- keyed identifiers ---------------------------------------------------------------------


def test_keyed_ids_are_stable_across_uploads_and_link_across_tables(city):
    inst, src, data = city
    _ingest(inst, src)
    first = Store(inst).connect().table("residents").to_pandas()
    first_mov = Store(inst).connect().table("movements").to_pandas()
    _ingest(inst, src)
    con = Store(inst).connect()
    second = con.table("residents").to_pandas()
    assert sorted(first.person_id) == sorted(second.person_id)
    assert sorted(zip(first.person_id, first._rkey)) == sorted(zip(second.person_id, second._rkey))
    mov = con.table("movements").to_pandas()
    assert sorted(first_mov._rkey) == sorted(mov._rkey)
    # the person_id is the HMAC of the 宛名番号 under this instance's secret
    atena = data["residents.csv"][3]["atena_no"]
    pid = rules.keyed_id(inst.secret, "atena", atena)
    assert pid in set(second.person_id)
    # the same person's records link across residents, movements, childcare and tax
    persons = set(second.person_id)
    for table in ("movements", "childcare", "resident_tax"):
        ids = set(con.table(table).to_pandas().person_id)
        assert ids and ids <= persons, table
    child = data["childcare_certifications.csv"][0]["atena_no"]
    assert rules.keyed_id(inst.secret, "atena", child) in set(con.table("childcare").to_pandas().person_id)
    taxed = data["resident_tax.csv"][0]["atena_no"]
    assert rules.keyed_id(inst.secret, "atena", taxed) in set(con.table("resident_tax").to_pandas().person_id)


def test_keyed_ids_differ_under_another_secret(city, tmp_path):
    inst, src, _ = city
    _ingest(inst, src)
    other = Instance.create(tmp_path / "other")
    set_role(other, "hanako", "steward")
    _ingest(other, src)
    a = set(Store(inst).connect().table("residents").to_pandas().person_id)
    b = set(Store(other).connect().table("residents").to_pandas().person_id)
    assert len(a) == len(b) and not a & b


def test_rule_registry_matches_the_policy_vocabulary():
    assert set(rules.RULES) == set(policy_module.RULES)


def test_derivation_registry_matches_the_policy_vocabulary():
    from sekisho.ingest import derivations

    assert set(derivations.DERIVATIONS) == set(policy_module.DERIVATIONS)


def test_each_rule_stages_exactly_the_values_the_policy_says_it_releases():
    """The loader checks views against ``rule_releases``; the staging tables the views
    are built from must hold exactly those values (plus internal ``_`` columns)."""
    import re
    from datetime import date

    from sekisho.resources import resource_dir

    pol = policy_module.load_policy(resource_dir("policies") / "himeji.yaml")
    seen = set()
    for src in pol.sources.values():
        ctx = rules.RuleContext(source=src, extract_date=date(2026, 10, 31))
        for col in src.columns.values():
            selected = rules.RULES[col.rule](col, ctx).select
            staged = [re.search(r' AS "?([^" ]+)"?$', item).group(1) for item in selected]
            assert {n for n in staged if not n.startswith("_")} == set(policy_module.rule_releases(col)), col
            if col.rule in policy_module.EXACT_VALUE_RULES:
                assert rules.exact_column(col.name, col.rule).strip('"') in staged, col
            seen.add(col.rule)
    assert seen == set(policy_module.RULES), "the Himeji policy exercises every rule"


def test_age_band_sql():
    import duckdb

    con = duckdb.connect()
    got = [con.execute(f"SELECT {rules.age_band(str(a), 100)}").fetchone()[0] for a in (0, 4, 5, 99, 100)]
    assert got == ["0-4", "0-4", "5-9", "95-99", "100+"]
    b, on = "DATE '2000-11-01'", "DATE '2026-10-31'"
    assert con.execute(f"SELECT {rules.age_at(b, on)}").fetchone()[0] == 25


# ---- bad input ----------------------------------------------------------------------------


def _rewrite(path: Path, mutate) -> None:
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
    mutate(rows)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _col(rows, name):
    return rows[0].index(name)


BAD_INPUTS = [
    # (id, file, mutate(rows), expected line, expected column, words)
    ("unknown column", "residents.csv",
     lambda rows: [r.append("x") for r in rows] and rows[0].__setitem__(-1, "mynumber"),
     1, "mynumber", "unknown column"),
    ("missing column", "movements.csv",
     lambda rows: [r.pop(_col(rows, "idou_type")) for r in rows[1:]] and rows[0].remove("idou_type"),
     1, "idou_type", "missing"),
    ("wrong type: date", "residents.csv",
     lambda rows: rows[5].__setitem__(_col(rows, "birth_date"), "1980/04/12"),
     6, "birth_date", "YYYY-MM-DD"),
    ("wrong type: impossible date", "movements.csv",
     lambda rows: rows[3].__setitem__(_col(rows, "idou_date"), "2024-02-30"),
     4, "idou_date", "YYYY-MM-DD"),
    ("wrong type: integer", "resident_tax.csv",
     lambda rows: rows[7].__setitem__(_col(rows, "income_levy"), "12,000"),
     8, "income_levy", "not an integer"),
    ("code of the wrong length", "residents.csv",
     lambda rows: rows[2].__setitem__(_col(rows, "atena_no"), "12345"),
     3, "atena_no", "exactly 10"),
    ("value outside the code list", "residents.csv",
     lambda rows: rows[4].__setitem__(_col(rows, "sex"), "9"),
     5, "sex", "allowed codes"),
    ("required value empty", "residents.csv",
     lambda rows: rows[9].__setitem__(_col(rows, "setai_no"), ""),
     10, "setai_no", "required"),
    ("duplicate 宛名番号", "residents.csv",
     lambda rows: rows[12].__setitem__(_col(rows, "atena_no"), rows[2][_col(rows, "atena_no")]),
     13, "atena_no", "duplicate"),
    ("movement of an unknown person", "movements.csv",
     lambda rows: rows[2].__setitem__(_col(rows, "atena_no"), "0999999999"),
     3, "atena_no", "not in residents.csv"),
    ("certification at an unknown facility", "childcare_certifications.csv",
     lambda rows: rows[1].__setitem__(_col(rows, "facility_id"), "F999"),
     2, "facility_id", "not in childcare_facilities.csv"),
    ("address not in the address master", "residents.csv",
     lambda rows: rows[6].__setitem__(_col(rows, "gaiku"), "77"),
     7, "chome_code, gaiku", "not in address_master.csv"),
    ("too many fields", "movements.csv",
     lambda rows: rows[4].append("extra"),
     5, None, "too many fields"),
    ("too few fields", "resident_tax.csv",
     lambda rows: rows[3].pop(),
     4, None, "too few fields"),
]


@pytest.mark.parametrize("file, mutate, line, column, words",
                         [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_naming_file_line_column_and_changes_nothing(
        city, file, mutate, line, column, words):
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    _rewrite(src / file, mutate)
    with pytest.raises(IngestError) as exc:
        _ingest(inst, src)
    problems = exc.value.problems
    match = [p for p in problems if p.file == file and p.line == line
             and (column is None or p.column == column) and words in p.message]
    assert match, f"expected {file}:{line} [{column}] {words!r}, got:\n{exc.value}"
    assert f"{file}:{line}" in str(exc.value)
    last = assert_unchanged(inst, before)
    assert last["outcome"] == "failed" and last["user"] == "hanako"
    assert any(p["file"] == file and p["line"] == line for p in last["details"]["problems"])


def _second_certification(rows, cert_date: str, cert_type: str | None = None) -> None:
    """A second certification of the first certified child, decided on ``cert_date``."""
    first = list(rows[1])
    first[_col(rows, "cert_no")] = "C99999"
    first[_col(rows, "cert_date")] = cert_date
    if cert_type is not None:
        first[_col(rows, "cert_type")] = cert_type
    rows.append(first)


def test_two_certifications_of_a_child_in_one_month_and_type_are_refused_naming_view_and_columns(city):
    """``views.childcare.unique_per_person: [cert_ym, cert_type]`` is checked on every
    upload: a second certification of the same child, 認定年月 and 認定区分 (another cert_no,
    so the source's own unique key holds) refuses the whole upload and changes nothing."""
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    _rewrite(src / "childcare_certifications.csv", lambda rows: _second_certification(rows, "2025-03-28"))
    with pytest.raises(IngestError) as exc:
        _ingest(inst, src)
    (problem,) = [p for p in exc.value.problems if "unique_per_person" in p.message]
    assert problem.file == "childcare_certifications.csv" and problem.column == "cert_ym, cert_type"
    assert "views.childcare.unique_per_person" in problem.message and "2 rows of 1 person" in problem.message
    assert "childcare" in str(exc.value) and "cert_ym, cert_type" in str(exc.value)
    last = assert_unchanged(inst, before)
    assert last["outcome"] == "failed"
    assert any("unique_per_person" in p["message"] for p in last["details"]["problems"])


@pytest.mark.parametrize("cert_date, cert_type", [("2025-04-02", None), ("2025-03-20", "1号")],
                         ids=["another-month", "another-type"])
def test_certifications_of_a_child_in_another_month_or_type_are_accepted(city, cert_date, cert_type):
    inst, src, _ = city
    _rewrite(src / "childcare_certifications.csv",
             lambda rows: _second_certification(rows, cert_date, cert_type))
    result = _ingest(inst, src)
    assert result.tables["childcare"] == 8


def test_unterminated_quote_is_malformed_csv(city):
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    path = src / "childcare_facilities.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = '"F002,ほんまち保育所,保育所,中部第一,2820140102,0,45,20\n'
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(IngestError) as exc:
        _ingest(inst, src)
    assert any(p.file == "childcare_facilities.csv" and p.line == 3 and "quot" in p.message
               for p in exc.value.problems), str(exc.value)
    assert_unchanged(inst, before)


def test_missing_file_is_refused(city):
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    (src / "resident_tax.csv").unlink()
    with pytest.raises(IngestError, match="resident_tax.csv: file is missing"):
        _ingest(inst, src)
    assert_unchanged(inst, before)


def test_first_upload_failing_leaves_no_store(city):
    inst, src, _ = city
    _rewrite(src / "residents.csv", lambda rows: rows[3].__setitem__(1, "x"))
    with pytest.raises(IngestError):
        _ingest(inst, src)
    assert Store(inst).current() is None
    assert not list(inst.store_dir.glob(".building-*"))
    assert inst.audit.verify().ok


def test_non_steward_is_refused_and_audited(city):
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    for user in ("taro", "nobody"):
        with pytest.raises(IngestRefused, match="only a steward"):
            _ingest(inst, src, user=user)
        last = assert_unchanged(inst, before | {"audit": before["audit"]})
        assert last["user"] == user and last["outcome"] == "denied"


# ---- encodings ------------------------------------------------------------------------------


def _to_cp932(src: Path) -> None:
    for name in COLUMNS:
        p = src / name
        p.write_bytes(p.read_text(encoding="utf-8").encode("cp932"))


def test_cp932_export_is_read_with_cp932_and_auto(city):
    inst, src, data = city
    _to_cp932(src)
    r1 = _ingest(inst, src, encoding="cp932")
    assert {f["encoding"] for f in r1.files} == {"cp932"}
    con = Store(inst).connect()
    assert "飾磨区玉地１丁目" in set(con.table("residents").to_pandas().chome_name)
    said = []
    r2 = _ingest(inst, src, encoding="auto", log=said.append)
    enc = {f["file"]: f["encoding"] for f in r2.files}
    assert enc["residents.csv"] == enc["movements.csv"] == "cp932"
    assert enc["resident_tax.csv"] == "utf-8"   # pure ASCII is valid UTF-8
    assert any("residents.csv: encoding cp932 (detected)" in s for s in said)
    digests = {f["file"]: f["sha256"] for f in r2.files}
    assert digests["residents.csv"] == hashlib.sha256((src / "residents.csv").read_bytes()).hexdigest()
    assert sorted(con.table("residents").to_pandas().person_id) == \
        sorted(Store(inst).connect().table("residents").to_pandas().person_id)


def test_cp932_given_as_utf8_is_a_clear_error(city):
    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    _to_cp932(src)
    with pytest.raises(IngestError) as exc:
        _ingest(inst, src, encoding="utf-8")
    text = str(exc.value)
    assert "residents.csv:2" in text and "not valid UTF-8" in text and "--encoding cp932" in text
    assert_unchanged(inst, before)


def test_utf8_with_bom_and_crlf(city):
    inst, src, _ = city
    p = src / "residents.csv"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\n", b"\r\n"))
    r = _ingest(inst, src)
    assert r.tables["residents"] == 48


def test_audit_records_files_digests_and_snapshot(city):
    inst, src, _ = city
    r = _ingest(inst, src)
    e = [e for e in inst.audit.entries(type="ingest") if e["type"] == "ingest"][-1]
    d = e["details"]
    assert e["user"] == "hanako" and e["role"] == "steward" and e["outcome"] == "ok"
    assert d["snapshot"] == r.snapshot_id == Store(inst).current_id()
    assert d["policy_version"] == inst.policy_version
    files = {f["file"]: f for f in d["files"]}
    assert set(files) == set(COLUMNS)
    res = files["residents.csv"]
    assert res["sha256"] == hashlib.sha256((src / "residents.csv").read_bytes()).hexdigest()
    assert res["rows_accepted"] == 48 and res["rows_rejected"] == 0 and res["encoding"] == "utf-8"
    assert d["duration_s"] > 0


def test_no_raw_copy_survives_in_the_instance_or_tmp(city):
    import tempfile

    inst, src, _ = city
    _ingest(inst, src)
    # (other processes on the machine may be ingesting: look only for this process's)
    assert not list(Path(tempfile.gettempdir()).glob(f"sekisho-ingest-{os.getpid()}-*"))
    leftovers = [p for p in inst.home.rglob("*") if p.suffix == ".csv"]
    assert not leftovers


def test_digest_helper_process_agrees_with_hmac_and_exits():
    import hmac as hmac_module
    import os as os_module

    from sekisho.ingest.keys import PARALLEL_MIN, DigestPool

    key = os_module.urandom(32)
    values = [f"{i:010d}".encode() for i in range(PARALLEL_MIN + 3)]
    with DigestPool(helpers=1) as pool:
        proc = pool.proc
        blob = pool.digests(key, b"atena:", values)
    assert proc.poll() is not None, "the helper must exit when the pool closes"
    for i in (0, len(values) // 2, len(values) - 1):
        assert blob[32 * i:32 * i + 32] == hmac_module.digest(key, b"atena:" + values[i], "sha256")


def _instance_with_policy(tmp_path, mutate) -> Instance:
    import yaml

    from sekisho.resources import resource_dir

    doc = yaml.safe_load((resource_dir("policies") / "himeji.yaml").read_text(encoding="utf-8"))
    mutate(doc)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "himeji.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    inst = Instance.create(tmp_path / "custom", policy_dir=pdir)
    set_role(inst, "hanako", "steward")
    return inst


def test_rules_are_selected_and_parametrised_by_the_policy(tmp_path):
    src = tmp_path / "export"
    data = write_mini_city(src)

    def swap_labels(doc):
        doc["sources"]["residents"]["columns"]["sex"]["params"]["labels"] = {"1": "女", "2": "男"}

    inst = _instance_with_policy(tmp_path, swap_labels)
    _ingest(inst, src)
    res = Store(inst).connect().table("residents").to_pandas()
    pid = rules.keyed_id(inst.secret, "atena", data["residents.csv"][0]["atena_no"])
    assert data["residents.csv"][0]["sex"] == "1"
    assert res[res.person_id == pid].sex.item() == "女"


def test_a_view_column_no_rule_produces_is_refused_before_anything_is_read(tmp_path):
    """A view may only use values the rules release: dropping a column a view uses makes
    the policy invalid, refused (and audited) before the upload reads a file."""
    src = tmp_path / "export"
    write_mini_city(src)

    def drop_reason(doc):
        doc["sources"]["residents"]["columns"]["removal_reason"]["rule"] = "drop"

    inst = _instance_with_policy(tmp_path, drop_reason)
    with pytest.raises(policy_module.PolicyError) as exc:
        _ingest(inst, src)
    assert exc.value.key == "views.residents.columns.removal_reason"
    assert "rule 'drop', which releases nothing" in exc.value.problem
    assert Store(inst).current() is None and inst.audit.verify().ok
    last = list(inst.audit.entries())[-1]
    assert last["type"] == "ingest.failed" and "views.residents.columns.removal_reason" in last["details"]["reason"]


def test_unexpected_engine_error_is_audited_without_quoted_values(city, monkeypatch):
    from sekisho.ingest import views as views_module

    inst, src, data = city
    atena = data["residents.csv"][0]["atena_no"]

    def broken(*args, **kwargs):
        raise RuntimeError(f"Conversion Error: Could not convert string '{atena}' to INT32")

    monkeypatch.setattr(views_module, "build", broken)
    with pytest.raises(RuntimeError):
        _ingest(inst, src)
    last = list(inst.audit.entries())[-1]
    assert last["type"] == "ingest.failed" and last["outcome"] == "failed"
    assert "Conversion Error" in last["details"]["reason"]
    assert atena not in (inst.audit_dir / "audit.jsonl").read_text(encoding="utf-8")
    assert Store(inst).current() is None and not list(inst.store_dir.glob(".building-*"))


def test_audit_failure_means_no_switch(city, monkeypatch):
    """The `ingest` entry is written before CURRENT moves; if it cannot be made durable
    the upload fails closed and the new snapshot is discarded."""
    from sekisho.audit import AuditError

    inst, src, _ = city
    _ingest(inst, src)
    before = store_state(inst)
    real_append = inst.audit.append

    def append(type, **kw):
        if type == "ingest":
            raise AuditError("disk full")
        return real_append(type, **kw)

    monkeypatch.setattr(inst.audit, "append", append)
    with pytest.raises(AuditError):
        _ingest(inst, src)
    monkeypatch.undo()
    last = assert_unchanged(inst, before)
    assert "AuditError" in last["details"]["reason"]


def test_files_the_policy_does_not_name_are_ignored_and_recorded(city):
    inst, src, _ = city
    (src / "my_number.csv").write_text("atena_no,kojin_bango\n0001000000,123456789012\n", encoding="utf-8")
    said = []
    _ingest(inst, src, log=said.append)
    assert any(s.startswith("my_number.csv: not named by the policy, ignored") for s in said)
    e = [e for e in inst.audit.entries(type="ingest") if e["type"] == "ingest"][-1]
    assert e["details"]["ignored_files"] == ["my_number.csv"]
    assert not scan_store(inst, {"123456789012"})
