"""The report notebooks' only door to data: SQL in, guard-protected DataFrame out.

* While publishing, ``sekisho reports publish`` sets ``SEKISHO_HOME`` and
  ``SEKISHO_REPORTS_USER`` (the service identity ``reports``): queries go in-process
  through ``ibis.sekisho.connect(home=..., user="reports")``, i.e. through the guard.
* In an analyst's kernel neither is set: ``ibis.sekisho.connect()`` reaches the hub's
  guard service with the analyst's own hub token, so the analyst gets what the guard
  gives *them* — the same protected figures, as the protection is consistent (within
  one data snapshot: the guard redraws the perturbation for every snapshot).

Every query runs in threshold mode: cells below k come back missing (shown as ``X``,
秘匿), the others carry the guard's consistent perturbation; each answer keeps its
per-cell status and accuracy (``df.sekisho``), and :func:`perturbation` tells the page
and the CSV files how large the perturbation is.
"""

from __future__ import annotations

import os
from functools import lru_cache

import pandas as pd

from sekisho.client import GuardRefusal
from sekisho.client.status import attach

MODE = "threshold"
#: refusals that mean "nothing may be shown for this selection", not a faulty query: too
#: few persons selected, or (for an analyst, whose queries the condition-influence rule
#: checks) conditions that change too few persons to settle on an answer
NOTHING_TO_REPORT = frozenset({"filter_population_below_k", "condition_influence_below_k"})


def _empty(schema) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in schema.names})


class GuardConnection:
    """A small uniform face over the sekisho ibis backend (SQL in, DataFrame out)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.summaries: list[dict] = []

    def sql(self, query: str) -> pd.DataFrame:

        # con.sql(...) sends this exact SQL to the guard (no ibis rewriting)
        expr = self.backend.sql(query)
        try:
            table = expr.to_pyarrow(mode=MODE)
        except GuardRefusal as refused:
            if refused.code not in NOTHING_TO_REPORT:
                raise
            # too few people in the selection: every cell of this table is withheld
            self.summaries.append({"refused": refused.code})
            return _empty(expr.schema())
        if self.backend.last_summary:
            self.summaries.append(self.backend.last_summary)
        df = table.to_pandas()
        # plain values; per-cell status and accuracy through df.sekisho (sekisho.client.status)
        attach(df, self.backend.last_summary, getattr(self.backend, "last_cells", None))
        return df

    def perturbation(self) -> dict | None:
        """The perturbation the guard applied to this report's figures (from the answers'
        summaries): ``{"method", "max_noise", ...}``, or None before any answer."""
        for summary in reversed(self.summaries):
            if isinstance(summary, dict) and summary.get("perturbation"):
                return summary["perturbation"]
        return None


def _ibis_backend():
    import ibis

    home, user = os.environ.get("SEKISHO_HOME"), os.environ.get("SEKISHO_REPORTS_USER")
    if home and user:
        return ibis.sekisho.connect(home=home, user=user)
    return ibis.sekisho.connect()


@lru_cache(maxsize=1)
def connect() -> GuardConnection:
    return GuardConnection(_ibis_backend())


def sql(query: str) -> pd.DataFrame:
    """Run ``query`` through the guard (threshold mode) and return the protected table."""
    return connect().sql(query)


def perturbation() -> dict | None:
    """The perturbation of the figures asked so far in this process (None: none asked)."""
    if connect.cache_info().currsize == 0:
        return None
    return connect().perturbation()
