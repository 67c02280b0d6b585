"""The report notebooks (`reports/0*_*.ipynb`) are the source: analysts edit them in
JupyterLab and papermill runs them as they are. No script regenerates them, so this file
keeps their shared structure, as `test_policy.py` keeps the processing standard in sync:

* a title cell first (`# <title>`, the title the catalogue and the published page show);
* then the papermill `parameters` cell, the same in every notebook;
* then the shared set-up cell, the same in every notebook: the only imports, the guard
  connection (`query`), the report (`report`) and the resolved parameters;
* no outputs stored (a notebook saved after a run: `jupyter nbconvert --clear-output
  --inplace reports/0*.ipynb`), one kernel spec (the one the publisher uses);
* readable names: nothing at module level (or a parameter of a function defined there)
  named with one letter; a reader of a report should not have to decode `R` or `q`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from sekisho.reports import catalog
from sekisho.reports.publish import KERNEL
from sekisho.resources import resource_dir

REPORTS = resource_dir("reports")
NOTEBOOKS = sorted(REPORTS.glob("0*_*.ipynb"))
KERNELSPEC = {"name": KERNEL, "display_name": "Python 3 (ipykernel)", "language": "python"}
PARAMETERS = ("base_month", "compare_month", "period", "area_level", "tables_dir")
#: what the set-up cell gives every later cell (never rebound by them)
SHARED = ("context", "report", "query", "BASE_MONTH", "COMPARE_MONTH", "AREA_COLUMN", "IN_BASE_YEAR")
CLEAR = "jupyter nbconvert --clear-output --inplace reports/0*.ipynb"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list[tuple[int, str]]:
    return [(i, cell.source) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]


def module_bindings(tree: ast.Module) -> list[tuple[str, int]]:
    """Names a cell binds at module level, and the parameters of the functions it defines
    there, with their line numbers (comprehensions, lambdas and function bodies are their
    own scopes and are not entered)."""
    found: list[tuple[str, int]] = []

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            found.append((node.id, node.lineno))
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                targets(element)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.name, node.lineno))
            if not isinstance(node, ast.ClassDef):
                arguments = node.args
                for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                 arguments.vararg, arguments.kwarg):
                    if argument is not None:
                        found.append((argument.arg, argument.lineno))
            return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        if isinstance(node, ast.Assign):
            for target in node.targets:
                targets(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
            targets(node.target)
        elif isinstance(node, ast.NamedExpr):
            targets(node.target)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    targets(item.optional_vars)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                found.append(((alias.asname or alias.name).split(".")[0], node.lineno))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found.append((node.name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {path.stem: read(path) for path in NOTEBOOKS}


def test_the_eight_report_notebooks_are_the_catalogue():
    assert [path.stem for path in NOTEBOOKS] == [nb.name for nb in catalog.notebooks()]
    assert len(NOTEBOOKS) == 8


def test_each_notebook_opens_with_its_title(notebooks):
    for name, nb in notebooks.items():
        first = nb.cells[0]
        assert first.cell_type == "markdown", name
        heading = first.source.splitlines()[0]
        assert heading.startswith("# ") and heading[2:].strip(), (name, heading)
        # the catalogue (and so the published page) shows the metadata title: keep them one
        assert nb.metadata.get("sekisho", {}).get("title") == heading[2:].strip(), name


def test_the_parameters_cell_comes_second_and_is_shared(notebooks):
    cells = {}
    for name, nb in notebooks.items():
        tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
        assert tagged == [1], (name, "one cell tagged `parameters`, right after the title")
        cell = nb.cells[1]
        assert cell.cell_type == "code", name
        tree = ast.parse(cell.source)
        # papermill injects its values after this cell: plain assignments of literals only
        assigned = []
        for statement in tree.body:
            assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, (name, ast.unparse(statement))
            assert isinstance(statement.targets[0], ast.Name), (name, ast.unparse(statement))
            ast.literal_eval(statement.value)
            assigned.append(statement.targets[0].id)
        assert tuple(assigned) == PARAMETERS, name
        cells[name] = cell.source
    assert len(set(cells.values())) == 1, "the parameters cell differs between notebooks"


def test_the_setup_cell_comes_third_and_is_shared(notebooks):
    cells = {}
    for name, nb in notebooks.items():
        cell = nb.cells[2]
        assert cell.cell_type == "code" and not cell.metadata.get("tags"), name
        tree = ast.parse(cell.source)
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name) and node.func.id == "start"]
        assert len(calls) == 1, (name, "the set-up opens the report with start(...)")
        passed = {keyword.arg: keyword.value for keyword in calls[0].keywords}
        assert set(passed) == set(PARAMETERS), name
        assert all(isinstance(v, ast.Name) and v.id == k for k, v in passed.items()), name
        bound = {binding for binding, _ in module_bindings(tree)}
        assert set(SHARED) <= bound, (name, set(SHARED) - bound)
        assert "query = data.sql" in cell.source, (name, "data only through the guard helper")
        cells[name] = cell.source
    assert len(set(cells.values())) == 1, (
        "the set-up cell differs between notebooks; change it in all of them: "
        + ", ".join(sorted(cells)))


def test_only_the_setup_imports_and_nothing_rebinds_what_it_shares(notebooks):
    for name, nb in notebooks.items():
        for index, source in code_cells(nb)[2:]:
            tree = ast.parse(source)
            imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
            assert not imports, (name, index, "imports belong in the shared set-up cell",
                                 [ast.unparse(node) for node in imports])
            rebound = {binding for binding, _ in module_bindings(tree)} & set(SHARED + PARAMETERS)
            assert not rebound, (name, index, rebound)


def test_no_one_letter_names(notebooks):
    offenders = []
    for name, nb in notebooks.items():
        for index, source in code_cells(nb):
            for binding, line in module_bindings(ast.parse(source)):
                if len(binding) == 1 and binding != "_":
                    offenders.append(f"{name} cell {index} line {line}: {binding}")
    assert not offenders, offenders


def test_no_outputs_stored_and_one_kernel(notebooks):
    for name, nb in notebooks.items():
        assert nb.metadata.get("kernelspec") == KERNELSPEC, name
        assert nb.metadata.get("language_info", {}).get("name") == "python", name
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name} cell {index} has stored outputs: {CLEAR}")
            assert "execution" not in cell.metadata, (f"{name} cell {index}: {CLEAR}")


def test_notebooks_are_stored_as_nbformat_writes_them():
    """What JupyterLab and nbconvert write: one JSON line per source line, so a change to a
    notebook reads as a line diff in review."""
    for path in NOTEBOOKS:
        nb = read(path)
        nbformat.validate(nb)
        assert path.read_text(encoding="utf-8") == nbformat.writes(nb) + "\n", (
            f"{path.name} is not in nbformat's layout: {CLEAR}")
