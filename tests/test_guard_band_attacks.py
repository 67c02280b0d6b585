"""Bands as trackers (issue 18): learning a person's household income band (所得割額の階層,
``household_levy_band``, a public band of a sensitive measure) through the band column.

The attacker knows a resident's 町丁目 and age (unique on both) and wants the band of their
household's 所得割額. Each spelling asks, for every band, a count with the target and one
without, and takes the band whose count moved. Bands are public dimensions, so a band
condition is an atom like any other: the condition that adds or removes the target
changes one person and is left out (condition influence), and both counts are the same
query. Each attack runs against the raw store too (``RawOracle``), where it must succeed.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from attack_oracle import RawOracle, assert_no_better_than_base, assert_real_attack, fresh_analyst
from guard_fixtures import truth
from sekisho.guard import Guard, QueryRefused
from sekisho.policy import load_instance_policy

TARGETS = 36


@pytest.fixture(scope="module")
def inst(real_city):
    """The ingested city's copy of this module's own, with holds off: what a single
    answer reveals is tested here, the holds that stop repeated probing elsewhere."""
    instance = real_city.instance
    text = instance.policy_path.read_text(encoding="utf-8")
    instance.policy_path.write_text(re.sub(r"(?m)^(\s+pause_on:).*$", r"\1 []", text), encoding="utf-8")
    return instance


@pytest.fixture(scope="module")
def guard(inst):
    g = Guard(inst)
    yield g
    g.close()


@pytest.fixture(scope="module")
def bands(inst):
    return [c.label for c in load_instance_policy(inst).bands["levy_class"].classes]


def targets(inst) -> list[tuple]:
    """Current residents unique on (chome_code, age) among current residents, with their
    household's band."""
    return truth(inst, "SELECT chome_code, age, any_value(household_levy_band) FROM residents WHERE is_current "
                       "GROUP BY 1, 2 HAVING COUNT(*) = 1 AND any_value(household_levy_band) IS NOT NULL "
                       f"ORDER BY hash(chome_code || age) LIMIT {TARGETS}")


def first(oracle, sql: str, user: str):
    try:
        rows = oracle.query(sql, user=user).table.to_pylist()
    except QueryRefused:
        return None
    return list(rows[0].values())[0] if rows else None


def padded(oracle, user, chome, age, band):
    # the band as the cell, the target as an OR branch next to a pad of the same age elsewhere
    pad = f"is_current AND age = {age} AND chome_code <> '{chome}'"
    target = f"is_current AND chome_code = '{chome}' AND age = {age}"
    both = first(oracle, f"SELECT COUNT(*) AS n FROM residents WHERE household_levy_band = '{band}' "
                         f"AND (({pad}) OR ({target}))", user)
    alone = first(oracle, f"SELECT COUNT(*) AS n FROM residents WHERE household_levy_band = '{band}' AND {pad}",
                  user)
    return None if both is None or alone is None else both - alone


def band_minus_target(oracle, user, chome, age, band):
    # the band's whole count, and the same without the target
    everyone = first(oracle, f"SELECT COUNT(*) AS n FROM residents WHERE is_current "
                             f"AND household_levy_band = '{band}'", user)
    but = first(oracle, f"SELECT COUNT(*) AS n FROM residents WHERE is_current AND household_levy_band = '{band}' "
                        f"AND NOT (chome_code = '{chome}' AND age = {age})", user)
    return None if everyone is None or but is None else everyone - but


def grouped(oracle, user, chome, age, band):
    # one query per target: the bands as groups, with and without the target as two cells
    try:
        rows = oracle.query(f"SELECT household_levy_band AS b, COUNT(*) AS a, COUNT(*) FILTER "
                            f"(WHERE NOT (chome_code = '{chome}' AND age = {age})) AS o FROM residents "
                            f"WHERE is_current AND age = {age} GROUP BY 1", user=user).table.to_pylist()
    except QueryRefused:   # the age's population under k (decided on a perturbed count): no idea
        return None
    mine = [r for r in rows if r["b"] == band]
    if not mine or mine[0]["a"] is None or mine[0]["o"] is None:
        return None
    return mine[0]["a"] - mine[0]["o"]


@pytest.mark.parametrize("moved", [padded, band_minus_target, grouped], ids=lambda f: f.__name__)
def test_bands_as_trackers_do_not_give_a_households_band(moved, guard, inst, bands):
    found = targets(inst)
    common = Counter(b for *_, b in found).most_common(1)[0][0]
    for oracle, real in ((RawOracle(inst), True), (guard, False)):
        user = fresh_analyst(inst, "band")
        hits = base = 0
        for chome, age, band in found:
            moves = {b: moved(oracle, user, chome, age, b) for b in bands}
            best = max((m, b) for b, m in moves.items() if m is not None) if any(
                m is not None for m in moves.values()) else None
            guess = best[1] if best is not None and best[0] >= 1 else common
            hits += guess == band
            base += common == band
        if real:
            assert_real_attack(hits, len(found))
        else:
            assert_no_better_than_base(hits, base, len(found))
