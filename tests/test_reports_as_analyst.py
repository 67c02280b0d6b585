"""Every report notebook runs to the end as an *analyst* — condition influence on — as
an analyst would run it in their own kernel (issue 17: notebook 01 used to fail there
with DuckDB's ``'//(BOOLEAN, INTEGER_LITERAL)'`` once the rule rewrote a comparison
inside the age-at-month arithmetic; the published versions worked because the
``reports`` identity runs without the rule). The kernel's in-process guard serves the
analyst (``SEKISHO_REPORTS_USER``); ``benchmarks/notebooks_as_analyst.py`` runs the
same at 530k and prints each notebook's time and memory."""

from __future__ import annotations

import os

import pytest

from sekisho.reports.catalog import notebooks
from sekisho.reports.periods import add_months
from sekisho.reports.publish import render_one
from sekisho.state import set_role

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def as_analyst(published_city, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("as-analyst")
    set_role(published_city.instance, "nb_analyst", "analyst")
    env = {"SEKISHO_HOME": str(published_city.instance.home), "SEKISHO_REPORTS_USER": "nb_analyst",
           "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"), "IPYTHONDIR": str(scratch / "ipython"),
           "MPLCONFIGDIR": str(scratch / "mpl"), "JUPYTER_PLATFORM_DIRS": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    base = published_city.extract.strftime("%Y-%m")
    yield scratch, {"base_month": base, "compare_month": add_months(base, -12), "period": 5,
                    "area_level": "地域ブロック"}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda nb: nb.name)
def test_the_notebook_runs_to_the_end_for_an_analyst(as_analyst, notebook):
    scratch, parameters = as_analyst
    outcome = render_one(notebook, parameters, scratch / notebook.name, meta=[])
    assert outcome.ok, outcome.error
    assert outcome.tables   # its tables were written: the queries were answered
