"""A pass-through oracle for attack tests: the attacker's SQL run directly, read-only, on
the current snapshot's ``data.duckdb``, with no protection at all. It answers like
``Guard.query`` (``.query(sql, user=...)`` -> an object with a pyarrow ``.table``), so an
attack written against the guard runs unchanged against it; an attack that does not
succeed here is not a real attack (test oracle only; never for analysts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from sekisho.instance import Instance
from sekisho.store import Store


@dataclass
class RawResult:
    table: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)


class RawOracle:
    def __init__(self, instance: Instance):
        self.store = Store(instance)

    def query(self, sql: str, *, user: str = "", **_ignored) -> RawResult:
        path = self.store.snapshots_dir / self.store.current_id() / "data.duckdb"
        with duckdb.connect(str(path), read_only=True) as con:
            return RawResult(con.execute(sql).to_arrow_table())

    def close(self) -> None:
        pass


# ---- scoring attribute attacks on persons unique on (chome_code, age) -----------------------
TARGETS = 36
_analysts = iter(range(100_000))


def fresh_analyst(instance: Instance, prefix: str = "atk") -> str:
    """A new analyst per attack, so one attack's alerts (and holds) do not decide another's."""
    from sekisho.state import set_role

    name = f"{prefix}{next(_analysts)}"
    set_role(instance, name, "analyst")
    return name


def unique_targets(instance: Instance, limit: int = TARGETS) -> list[tuple]:
    """Persons unique on (chome_code, age) among all residents, with their sex: the
    attacker knows where they live and how old they are, and wants their sex.

    One per 町丁目 (its unique ages in a fixed order that is not by age): targets of one
    町丁目 share its cells, so the noise draws and near-k decisions behind their guesses
    are shared too, and 36 targets in three 町丁目 made an attack's hits swing by ±8
    between instance secrets (hits no better than a constant guess on average, yet
    "significant" for 1 secret in 15). The binomial tests of ``assert_no_better_than_base``
    assume independent targets."""
    path = Store(instance).snapshots_dir / Store(instance).current_id() / "data.duckdb"
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT chome_code, age, sex FROM (SELECT chome_code, age, any_value(sex) AS sex, "
                           "row_number() OVER (PARTITION BY chome_code ORDER BY (age * 37 + hash(chome_code) % 101) % 101, age) AS nth "
                           "FROM residents GROUP BY 1, 2 HAVING COUNT(*) = 1) WHERE nth = 1 "
                           f"ORDER BY 1 LIMIT {int(limit)}").fetchall()


def accuracy_attack(oracle, instance: Instance, guess_of, *, prefix: str = "atk") -> tuple[int, int, int]:
    """Run ``guess_of(oracle, user, chome, age)`` -> '女' / '男' / None (no idea: the
    attacker guesses the more common sex; a refusal counts as no idea) for every target;
    returns (hits, base hits, n)."""
    import statistics

    from sekisho.guard import QueryRefused

    user = fresh_analyst(instance, prefix)
    found = unique_targets(instance)
    common = statistics.mode(sex for _, _, sex in found)
    hits = base = 0
    for chome, age, sex in found:
        try:
            guess = guess_of(oracle, user, chome, age)
        except QueryRefused:
            guess = None
        hits += (guess or common) == sex
        base += common == sex
    return hits, base, len(found)


def assert_no_better_than_base(hits: int, base: int, n: int) -> None:
    """The issue's bar: accuracy below base + 0.10, or not significant (binomial, 1%)."""
    from scipy.stats import binomtest

    assert n >= 30
    p = base / n
    significant = binomtest(hits, n, p, alternative="greater").pvalue < 0.01
    assert hits / n < p + 0.10 or not significant, (hits, base, n)


def assert_real_attack(hits: int, n: int) -> None:
    assert n >= 30 and hits / n >= 0.95, (hits, n)
