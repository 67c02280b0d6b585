"""A second policy, with a dataset the Himeji policy does not have: a library-lending
register (``tests/data/library_policy.yaml``). Its sources, column types, joins, record
keys and derived columns — among them a derivation no Himeji view uses (``fiscal_year``)
and a band of a raw integer — are data only: the export below is ingested by the generic
view builder and queried through ``sekisho.guard.Guard`` with no Python of its own, and
the answers are protected aggregates (issue 16, item 4)."""

from __future__ import annotations

import csv
import random
import shutil
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from sekisho.guard import Guard, QueryRefused
from sekisho.ingest import IngestError, ingest
from sekisho.instance import Instance
from sekisho.policy import load_policy
from sekisho.resources import resource_dir
from sekisho.state import set_role
from sekisho.store import Store

from guard_fixtures import truth
from ingest_fixtures import scan_store

LIBRARY_POLICY = Path(__file__).resolve().parent / "data" / "library_policy.yaml"
BRANCHES = [("01", "中央図書館", 1972), ("02", "城東図書館", 1998), ("03", "網干図書館", 2004),
            ("04", "花の北分館", 2015)]
SMALL_BRANCH_BORROWERS = 4          # fewer than k: its cells must be suppressed
FIRST_LOAN, LAST_LOAN = date(2024, 4, 1), date(2026, 3, 31)


def write_library_export(directory: Path, *, borrowers: int = 240, seed: int = 11) -> dict[str, list[dict]]:
    """loans.csv and branches.csv: one row per checkout, 1-15 checkouts per borrower."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    loans = []
    for b in range(borrowers + SMALL_BRANCH_BORROWERS):
        card = f"{30000000 + b * 7:08d}"
        age = rng.randrange(3, 93)
        branch = "04" if b >= borrowers else rng.choices(["01", "02", "03"], weights=[5, 3, 2])[0]
        for _ in range(rng.randrange(1, 16)):
            day = FIRST_LOAN + timedelta(days=rng.randrange((LAST_LOAN - FIRST_LOAN).days + 1))
            loans.append({"card_no": card, "borrower_name": f"利用者 {b}", "branch_code": branch,
                          "item_category": str(rng.randrange(10)), "loan_date": day.isoformat(),
                          "due_date": (day + timedelta(days=14)).isoformat(),
                          "borrower_age": str(age), "items": str(rng.randrange(1, 11))})
    for n, loan in enumerate(loans, start=1):
        loan["loan_id"] = f"L{n:06d}"
    data = {"loans.csv": loans,
            "branches.csv": [{"branch_code": c, "branch_name": name, "opened": str(year)}
                             for c, name, year in BRANCHES]}
    for name, rows in data.items():
        with open(directory / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return data


def library_instance(home: Path) -> Instance:
    """An instance whose policy in force is the library policy, with a steward and an analyst."""
    policy_dir = home.parent / "library-policy"
    policy_dir.mkdir(parents=True)
    shutil.copyfile(LIBRARY_POLICY, policy_dir / "library.yaml")
    Instance.create(home, policy_dir=policy_dir)
    config = yaml.safe_load((home / "config.yaml").read_text(encoding="utf-8"))
    config["policy"]["file"] = "library.yaml"
    (home / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                      encoding="utf-8")
    inst = Instance.open(home)
    set_role(inst, "librarian", "steward")
    set_role(inst, "ana", "analyst")
    return inst


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    base = tmp_path_factory.mktemp("library")
    data = write_library_export(base / "export")
    inst = library_instance(base / "home")
    result = ingest(inst, base / "export", user="librarian")
    guard = Guard(inst)
    yield inst, data, result, guard
    guard.close()


def _derivations(origin) -> set[str]:
    """The derivations an origin uses, nested ones included."""
    params = getattr(origin, "params", None)
    if params is None:
        return set()
    found = {origin.name}
    for value in params.values():
        for item in value if isinstance(value, tuple) else (value,):
            found |= _derivations(item)
    return found


def _fiscal_years(origin) -> list:
    """The fiscal_year derivations inside an origin."""
    params = getattr(origin, "params", None)
    if params is None:
        return []
    found = [origin] if origin.name == "fiscal_year" else []
    for value in params.values():
        for item in value if isinstance(value, tuple) else (value,):
            found += _fiscal_years(item)
    return found


def test_the_library_policy_uses_what_the_himeji_policy_does_not():
    library, himeji = load_policy(LIBRARY_POLICY), load_policy(resource_dir("policies") / "himeji.yaml")
    used = {p: set().union(*(_derivations(c.origin) for v in pol.views.values() for c in v.columns.values()))
            for p, pol in (("library", library), ("himeji", himeji))}
    assert "fiscal_year" in used["library"]
    # Himeji's fiscal years (issue 18: the 保育料 tax year) begin in September; the library's
    # 年度 in April: the same derivation serves both only because it is data
    starts = {p: {o.params["first_month"] for v in pol.views.values() for c in v.columns.values()
                  for o in _fiscal_years(c.origin)}
              for p, pol in (("library", library), ("himeji", himeji))}
    assert 4 in starts["library"] and 4 not in starts["himeji"]
    assert not set(library.sources) & set(himeji.sources) and not set(library.views) & set(himeji.views)
    assert library.views["loans"].joins["branch"].source == "branches"
    assert library.views["loans"].record_key.record.column == "loan_id"


def test_the_export_becomes_exactly_the_declared_views(library):
    inst, data, result, _ = library
    pol = load_policy(inst.policy_path)
    assert result.tables == {"loans": len(data["loans.csv"]), "branches": len(BRANCHES)}
    assert result.extract_date == "2026-03-31"      # from loan_date (sets_extract_date), not due_date
    con = Store(inst).connect()
    for name, view in pol.views.items():
        assert list(con.table(name).columns) == list(view.columns) + ([] if view.public else ["_rkey"])
    # the derived columns, checked against the raw export
    by_row = {(r["fiscal_year"], r["age_band"], r["branch"], r["category"]): r["n"] for r in
              [dict(zip(("fiscal_year", "age_band", "branch", "category", "n"), row)) for row in truth(
                  inst, "SELECT fiscal_year, age_band, branch, category, count(*) FROM loans GROUP BY ALL")]}
    names = {c: n for c, n, _ in BRANCHES}
    labels = dict(load_policy(LIBRARY_POLICY).sources["loans"].columns["item_category"].params["labels"])
    expected: dict[tuple, int] = {}
    for loan in data["loans.csv"]:
        day, age = date.fromisoformat(loan["loan_date"]), int(loan["borrower_age"])
        key = (day.year if day.month >= 4 else day.year - 1,
               "80+" if age >= 80 else f"{age // 10 * 10}-{age // 10 * 10 + 9}",
               names[loan["branch_code"]], labels[loan["item_category"]])
        expected[key] = expected.get(key, 0) + 1
    assert by_row == expected


def test_no_raw_value_of_the_export_reaches_the_store(library):
    inst, data, result, _ = library
    needles = set()
    for loan in data["loans.csv"]:
        needles |= {loan["card_no"], loan["borrower_name"], loan["loan_date"], loan["due_date"], loan["loan_id"]}
    # the extract date is public (the snapshot's meta records it), not a borrower's date
    assert not scan_store(inst, needles - {result.extract_date})
    con = Store(inst).connect()
    assert "borrower_age" not in con.table("loans").columns     # only its band is released


def test_counts_by_branch_are_protected_aggregates(library):
    inst, _, _, guard = library
    r = guard.query("SELECT branch, COUNT(*) AS loans FROM loans GROUP BY branch", user="ana")
    assert r.table.column_names == ["branch", "loans"]
    assert r.summary["mode"] == "threshold"
    rows = {row["branch"]: row["loans"] for row in r.table.to_pylist()}
    assert set(rows) == {name for _, name, _ in BRANCHES}       # densified to the declared domain
    true_loans = dict(truth(inst, "SELECT branch, count(*) FROM loans GROUP BY branch"))
    borrowers = dict(truth(inst, "SELECT branch, count(DISTINCT borrower_id) FROM loans GROUP BY branch"))
    assert borrowers["花の北分館"] == SMALL_BRANCH_BORROWERS
    assert rows["花の北分館"] is None and r.summary["cells_suppressed"] == 1
    max_noise = load_policy(inst.policy_path).disclosure.perturbation.max_noise
    for branch, n in rows.items():
        if branch != "花の北分館":
            assert abs(n - true_loans[branch]) <= max_noise, branch


def test_derived_columns_group_and_filter_through_the_guard(library):
    inst, _, _, guard = library
    r = guard.query("SELECT fiscal_year, age_band, COUNT(DISTINCT borrower_id) AS borrowers FROM loans "
                    "WHERE branch = '中央図書館' GROUP BY fiscal_year, age_band", user="ana")
    assert not r.summary.get("conditions_left_out")
    true = {(y, b): n for y, b, n in truth(
        inst, "SELECT fiscal_year, age_band, count(DISTINCT borrower_id) FROM loans "
              "WHERE branch = '中央図書館' GROUP BY ALL")}
    rows = r.table.to_pylist()
    assert len(rows) == 2 * 9                          # both fiscal years x nine bands (densified)
    k = load_policy(inst.policy_path).disclosure.k
    assert any(row["borrowers"] is None for row in rows) and any(row["borrowers"] for row in rows)
    from sekisho.protocol import cells_by_column

    companion = cells_by_column(r.cells)["borrowers"]
    for row, state, low, high in zip(rows, *(companion[c].to_pylist() for c in ("status", "low", "high"))):
        n_true = true.get((row["fiscal_year"], row["age_band"]), 0)
        if state == "widened":
            # answered without ``branch = ...`` where it changes fewer than k borrowers (maybe
            # none; sekisho.guard.cell_widening): the count asked for within the interval
            assert low <= n_true <= high, (row, low, high)
        elif n_true < k:
            assert row["borrowers"] is None, row
        elif row["borrowers"] is not None:             # (or below the perturbed minimum count)
            assert abs(row["borrowers"] - n_true) <= 2, row
    total = guard.query("SELECT category, SUM(items) AS items FROM loans GROUP BY category", user="ana")
    assert total.table.column_names == ["category", "items"] and total.table.num_rows == 10


def test_dp_mode_answers_the_new_view(library):
    _, _, _, guard = library
    r = guard.query("SELECT branch, COUNT(*) AS loans FROM loans GROUP BY branch", user="ana",
                    mode="dp", epsilon=0.5)
    assert r.summary["mode"] == "dp" and r.summary["epsilon_spent"] == pytest.approx(0.5)
    assert r.table.column_names == ["branch", "loans"]


def test_row_level_questions_are_refused(library):
    _, _, _, guard = library
    for sql in ("SELECT borrower_id, loan_ym FROM loans", "SELECT * FROM loans",
                "SELECT branch, COUNT(*) FROM loans WHERE borrower_id = 'x' GROUP BY branch"):
        with pytest.raises(QueryRefused):
            guard.query(sql, user="ana")
    # the public view is answered as it is
    r = guard.query("SELECT branch_name, opened FROM branches ORDER BY branch_code", user="ana")
    assert r.table.to_pylist()[0] == {"branch_name": "中央図書館", "opened": 1972}


def test_a_value_outside_a_derived_domain_is_refused(tmp_path):
    """The declared domains bind the derived columns too: a negative age makes a band the
    policy does not list, and the upload is refused naming the view column."""
    write_library_export(tmp_path / "export", borrowers=30)
    path = tmp_path / "export" / "loans.csv"
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
    rows[5][rows[0].index("borrower_age")] = "-3"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    inst = library_instance(tmp_path / "home")
    with pytest.raises(IngestError) as exc:
        ingest(inst, tmp_path / "export", user="librarian")
    assert any(p.column == "age_band" and "views.loans.age_band" in p.message for p in exc.value.problems), \
        str(exc.value)
    assert Store(inst).current() is None


def test_the_processing_standard_documents_the_new_dataset():
    """The processing standard is generated from any policy, the new vocabulary included."""
    from sekisho.ingest.standard import render

    text = render(load_policy(LIBRARY_POLICY))
    assert "`fiscal_year(loan_ym, first_month=4)`" in text and "`band(borrower_age, width=10, top=80)`" in text
    assert "結合 `branch`: 図書館一覧(公開情報) `branches.csv` (branch_code → branch_code)" in text
