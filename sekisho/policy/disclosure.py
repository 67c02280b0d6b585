"""The ``disclosure:`` section, checked: k, the dominance rules, cell-key perturbation,
differential privacy (ε per query, budget per period, contribution bounds) and the alerts.

These are the numbers the guard enforces on every answer; the checks here keep them in
the ranges where the guard's mechanisms work (e.g. ε above ``EPSILON_FLOOR``).
"""

from __future__ import annotations

import math
from typing import Any

from sekisho.policy.checker import Checker
from sekisho.policy.model import DP, Alerts, Disclosure, Dominance, Perturbation
from sekisho.policy.vocabulary import ALERT_NAMES, EPSILON_FLOOR, PERIODS


def read_disclosure(c: Checker, node: Any) -> Disclosure:
    node = c.section(node, "disclosure", Disclosure)
    k = c.integer(node["k"], "disclosure.k", minimum=2)
    dom = c.section(node["dominance"], "disclosure.dominance", Dominance)
    dominance = Dominance(
        nk_n=c.integer(dom["nk_n"], "disclosure.dominance.nk_n", minimum=1),
        nk_k=c.number(dom["nk_k"], "disclosure.dominance.nk_k", positive=True, maximum=1.0),
        p_percent=c.number(dom["p_percent"], "disclosure.dominance.p_percent", positive=True,
                           maximum=1.0))
    pk = "disclosure.perturbation"
    pt = c.section(node["perturbation"], pk, Perturbation)
    perturbation = Perturbation(
        enabled=c.boolean(pt["enabled"], f"{pk}.enabled"),
        max_noise=c.integer(pt["max_noise"], f"{pk}.max_noise", minimum=0),
        variance=c.number(pt["variance"], f"{pk}.variance", positive=True),
        min_count=c.integer(pt["min_count"], f"{pk}.min_count", minimum=0),
        seed=c.string(str(pt["seed"]), f"{pk}.seed"))
    dk = "disclosure.dp"
    d = c.section(node["dp"], dk, DP)
    dp = DP(
        epsilon_per_query_max=c.number(d["epsilon_per_query_max"], f"{dk}.epsilon_per_query_max",
                                       positive=True),
        budget_per_period=c.number(d["budget_per_period"], f"{dk}.budget_per_period", positive=True),
        period=c.string(d["period"], f"{dk}.period", choices=PERIODS),
        max_rows_per_person=c.integer(d["max_rows_per_person"], f"{dk}.max_rows_per_person", minimum=1),
        max_groups_per_person=c.integer(d["max_groups_per_person"], f"{dk}.max_groups_per_person",
                                        minimum=1),
        delta=c.number(d["delta"], f"{dk}.delta", positive=True, maximum=0.01),
        epsilon_per_query_min=c.number(d.get("epsilon_per_query_min", DP.epsilon_per_query_min),
                                       f"{dk}.epsilon_per_query_min", positive=True))
    if not math.isfinite(dp.epsilon_per_query_max):
        raise c.fail(f"{dk}.epsilon_per_query_max", "must be finite")
    if dp.epsilon_per_query_max > dp.budget_per_period:
        raise c.fail(f"{dk}.epsilon_per_query_max", "exceeds budget_per_period")
    if dp.epsilon_per_query_min < EPSILON_FLOOR:
        raise c.fail(f"{dk}.epsilon_per_query_min", f"must be >= {EPSILON_FLOOR}")
    if dp.epsilon_per_query_min > dp.epsilon_per_query_max:
        raise c.fail(f"{dk}.epsilon_per_query_min", "exceeds epsilon_per_query_max")
    ak = "disclosure.alerts"
    a = c.section(node["alerts"], ak, Alerts)
    pause_on = c.string_list(a.get("pause_on", []), f"{ak}.pause_on", allow_empty=True)
    for i, name in enumerate(pause_on):
        c.string(name, f"{ak}.pause_on[{i}]", choices=ALERT_NAMES)
    alerts = Alerts(**{f: c.integer(a[f], f"{ak}.{f}", minimum=1) for f in a if f != "pause_on"},
                    pause_on=pause_on)
    if alerts.decomposition_burst < 2:
        raise c.fail(f"{ak}.decomposition_burst", "must be >= 2 (one shape is no decomposition)")
    influence = c.boolean(node.get("condition_influence", True), "disclosure.condition_influence")
    return Disclosure(k=k, dominance=dominance, perturbation=perturbation, dp=dp, alerts=alerts,
                      condition_influence=influence)
