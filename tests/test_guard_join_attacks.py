"""Attacks through joins on the person and household keys (issue 18 item 1), each run twice:
against the pass-through oracle (``attack_oracle.RawOracle``: the same SQL on the raw
snapshot), where it must succeed — so it is a real attack — and against the guard, where it
must do no better than a constant guess (attribute accuracy below base + 0.10, or not
significant at 1%, over >= 30 targets) and recover fewer than 20% of exact household incomes.

Families: join fan-out to amplify one person, self-joins to isolate, linkage to single out a
household's composition or income, differencing through the joined view. Targets are persons
unique on (chome_code, age) — the attacker knows where they live and how old they are — and
the secret is their sex (or their household's income).
"""

from __future__ import annotations


import pytest

from attack_oracle import TARGETS, RawOracle, assert_no_better_than_base, assert_real_attack
from attack_oracle import accuracy_attack as _accuracy_attack, fresh_analyst as _fresh_analyst
from guard_fixtures import truth
from sekisho.guard import QueryRefused



@pytest.fixture(scope="module")
def inst(own_city):
    return own_city


@pytest.fixture(scope="module")
def raw(inst):
    return RawOracle(inst)



def fresh_analyst(inst) -> str:
    return _fresh_analyst(inst, "join")




def accuracy_attack(oracle, inst, guess_of):
    return _accuracy_attack(oracle, inst, guess_of, prefix="join")


def first_value(oracle, sql, user):
    rows = oracle.query(sql, user=user).table.to_pylist()
    return list(rows[0].values())[0] if rows else None








def on(alias, chome, age) -> str:
    return f"({alias}.chome_code = '{chome}' AND {alias}.age = {age})"


def difference(oracle, user, with_target: str, without: str) -> int | None:
    a, b = first_value(oracle, with_target, user), first_value(oracle, without, user)
    return None if a is None or b is None else a - b


# ---- family 1: join fan-out to amplify a person ---------------------------------------------------
def fan_out_in_on(oracle, user, chome, age):
    # the target's rows are doubled by the join (two tax years match only for the target):
    # the count of women rises by one if the target is a woman
    base = ("SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
            "AND t.tax_year = 2025 WHERE r.sex = '女'")
    attack = ("SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
              f"AND (t.tax_year = 2025 OR {on('r', chome, age)}) WHERE r.sex = '女'")
    d = difference(oracle, user, attack, base)
    return None if d is None else "女" if d >= 1 else "男"


def fan_out_self_joins(oracle, user, chome, age):
    # three joins multiply the target's rows by 8 (2 x 2 x 2 tax years), far above the noise
    sql = ("SELECT COUNT(*) AS n FROM residents r " + " ".join(
        f"JOIN resident_tax t{i} ON r.person_id = t{i}.person_id AND (t{i}.tax_year = 2025 OR {on('r', chome, age)})"
        for i in range(3)) + " WHERE r.sex = '女'")
    base = "SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id " \
           "AND t.tax_year = 2025 WHERE r.sex = '女'"
    d = difference(oracle, user, sql, base)
    return None if d is None else "女" if d >= 4 else "男"


def fan_out_across_views(oracle, user, chome, age):
    # two views with several rows per person, both matching the target twice or more
    base = ("SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
            "AND t.tax_year = 2025 WHERE r.sex = '女'")
    attack = ("SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
              f"AND (t.tax_year = 2025 OR {on('r', chome, age)}) LEFT JOIN movements m "
              f"ON r.person_id = m.person_id AND {on('r', chome, age)} WHERE r.sex = '女'")
    d = difference(oracle, user, attack, base)
    return None if d is None else "女" if d >= 1 else "男"


def fan_out_after_the_join(oracle, user, chome, age):
    # fan_out_in_on with the join in a subquery and its filter above it (ibis's filter after a
    # join): the target's two tax years pass the OR, and childcare (LEFT-joined) is a second
    # view of several rows per person that nothing fixes — the reading scope must see both
    base = ("SELECT COUNT(*) AS n FROM residents r JOIN resident_tax t ON r.person_id = t.person_id "
            "AND t.tax_year = 2025 WHERE r.sex = '女'")
    attack = ("SELECT COUNT(*) AS n FROM (SELECT r.sex, r.chome_code, r.age, t.tax_year, c.cert_ym, c.cert_type "
              "FROM residents r JOIN resident_tax t ON r.person_id = t.person_id LEFT JOIN childcare c "
              f"ON r.person_id = c.person_id) j WHERE j.sex = '女' AND (j.tax_year = 2025 OR {on('j', chome, age)})")
    d = difference(oracle, user, attack, base)
    return None if d is None else "女" if d >= 1 else "男"


# ---- family 2: self-joins that isolate ------------------------------------------------------------
def self_join_on_person(oracle, user, chome, age):
    sql = ("SELECT COUNT(*) AS n FROM residents a JOIN residents b ON a.person_id = b.person_id "
           f"WHERE {on('a', chome, age)} AND b.sex = '女'")
    n = first_value(oracle, sql, user)
    return None if n is None else "女" if n >= 1 else "男"


def self_semi_join(oracle, user, chome, age):
    # the same view as a semi-join (accepted): its conditions are conditions of the query
    sql = ("SELECT COUNT(*) AS n FROM residents r WHERE r.sex = '女' AND r.person_id IN "
           f"(SELECT person_id FROM residents x WHERE {on('x', chome, age)})")
    n = first_value(oracle, sql, user)
    return None if n is None else "女" if n >= 1 else "男"


def self_join_households(oracle, user, chome, age):
    # every pair of members of one household: the target's co-members' rows next to the target's
    sql = ("SELECT COUNT(*) AS n FROM residents a JOIN residents b ON a.household_id = b.household_id "
           f"WHERE {on('a', chome, age)} AND a.sex = '女'")
    n = first_value(oracle, sql, user)
    return None if n is None else "女" if n >= 1 else "男"


# ---- family 3: linkage singling out a household -----------------------------------------------------
def household_feature_join(oracle, user, chome, age):
    # persons joined to a household feature that marks the target's household
    sql = ("SELECT COUNT(*) AS n FROM residents r JOIN (SELECT household_id, "
           f"COUNT_IF(sex = '女' AND {on('residents', chome, age)}) AS t FROM residents GROUP BY household_id) h "
           "ON r.household_id = h.household_id WHERE h.t > 0")
    n = first_value(oracle, sql, user)
    return None if n is None else "女" if n >= 1 else "男"


def household_semi_join(oracle, user, chome, age):
    sql = ("SELECT COUNT(*) AS n FROM residents WHERE household_id IN (SELECT household_id FROM residents x "
           f"WHERE x.sex = '女' AND {on('x', chome, age)})")
    n = first_value(oracle, sql, user)
    return None if n is None else "女" if n >= 1 else "男"


def household_conditional_count(oracle, user, chome, age):
    # a LEFT join to household features and a count of the marked household's members
    sql = ("SELECT COUNT(*) AS everyone, COUNT(CASE WHEN h.t > 0 THEN 1 END) AS n FROM residents r "
           f"LEFT JOIN (SELECT household_id, COUNT_IF(sex = '女' AND {on('residents', chome, age)}) AS t "
           "FROM residents GROUP BY household_id) h ON r.household_id = h.household_id")
    rows = oracle.query(sql, user=user).table.to_pylist()
    n = rows[0]["n"] if rows else None
    return None if n is None else "女" if n >= 1 else "男"


# ---- family 4: differencing through the joined view ----------------------------------------------------
def anti_join_difference(oracle, user, chome, age):
    everyone = "SELECT COUNT(*) AS n FROM residents r WHERE r.sex = '女'"
    but_target = ("SELECT COUNT(*) AS n FROM residents r WHERE r.sex = '女' AND NOT EXISTS "
                  f"(SELECT 1 FROM residents x WHERE x.person_id = r.person_id AND {on('x', chome, age)})")
    d = difference(oracle, user, everyone, but_target)
    return None if d is None else "女" if d >= 1 else "男"


def semi_join_difference(oracle, user, chome, age):
    everyone = ("SELECT COUNT(*) AS n FROM residents r WHERE r.sex = '女' AND r.person_id IN "
                "(SELECT person_id FROM resident_tax WHERE tax_year = 2025)")
    but_target = ("SELECT COUNT(*) AS n FROM residents r WHERE r.sex = '女' AND r.person_id IN "
                  f"(SELECT person_id FROM resident_tax WHERE tax_year = 2025) AND r.person_id NOT IN "
                  f"(SELECT person_id FROM residents x WHERE {on('x', chome, age)})")
    d = difference(oracle, user, everyone, but_target)
    return None if d is None else "女" if d >= 1 else "男"


def inner_join_difference(oracle, user, chome, age):
    # the joined view without the target's row: an INNER join that drops one person
    everyone = ("SELECT COUNT(*) AS n FROM resident_tax t JOIN residents r ON r.person_id = t.person_id "
                "WHERE t.tax_year = 2025 AND t.sex = '女'")
    but_target = ("SELECT COUNT(*) AS n FROM resident_tax t JOIN residents r ON r.person_id = t.person_id "
                  f"AND NOT {on('r', chome, age)} WHERE t.tax_year = 2025 AND t.sex = '女'")
    d = difference(oracle, user, everyone, but_target)
    return None if d is None else "女" if d >= 1 else "男"


ATTACKS = {
    "fan_out": [fan_out_in_on, fan_out_self_joins, fan_out_across_views, fan_out_after_the_join],
    "self_join": [self_join_on_person, self_semi_join, self_join_households],
    "household": [household_feature_join, household_semi_join, household_conditional_count],
    "differencing": [anti_join_difference, semi_join_difference, inner_join_difference],
}


@pytest.mark.parametrize("attack", [a for group in ATTACKS.values() for a in group], ids=lambda f: f.__name__)
def test_join_attack_reveals_nothing(attack, guard, raw, inst):
    hits, _, n = accuracy_attack(raw, inst, attack)
    assert_real_attack(hits, n)
    assert_no_better_than_base(*accuracy_attack(guard, inst, attack))


# childcare joined to resident_tax, both several rows per person, every identity passed on
TWO_SEVERAL = ("(SELECT c.cert_type, c.cert_ym, t.tax_year, t.income_levy FROM childcare c JOIN resident_tax t "
               "ON c.person_id = t.person_id) j")


@pytest.mark.parametrize("sql, code", [
    # fan-out beyond one view's own rows, and measures repeated by a join
    ("SELECT COUNT(*) FROM movements m JOIN resident_tax t ON m.person_id = t.person_id", "join_fan_out"),
    ("SELECT SUM(t.income_levy) FROM movements m JOIN resident_tax t ON m.person_id = t.person_id "
     "WHERE t.tax_year = 2025", "join_fan_out"),
    ("SELECT COUNT(*) FROM (SELECT r.household_id, COUNT(*) AS m FROM residents r JOIN movements mv "
     "ON r.person_id = mv.person_id GROUP BY r.household_id) AS h", "join_fan_out"),
    # ... and below a filter written after the join: the scope reading the join's rows decides
    # with the identities it fixes, followed through the subquery's outputs (lineage, not names)
    (f"SELECT COUNT(*) FROM {TWO_SEVERAL} WHERE j.tax_year = 2025 OR j.cert_ym = '2025-04'", "join_fan_out"),
    ("SELECT j.cert_type, SUM(j.income_levy) FROM (SELECT c.cert_type, c.sex AS cert_ym, t.tax_year, t.income_levy "
     "FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id) j "
     "WHERE j.tax_year = 2025 AND j.cert_ym = '女' GROUP BY 1", "join_fan_out"),        # named cert_ym, is sex
    ("SELECT j.cert_type, SUM(j.income_levy) FROM (SELECT c.cert_type, CASE WHEN c.cert_ym >= '2025-03' "
     "THEN '2025-04' ELSE c.cert_ym END AS cert_ym, t.tax_year, t.income_levy FROM childcare c JOIN resident_tax t "
     "ON c.person_id = t.person_id) j WHERE j.tax_year = 2025 AND j.cert_ym = '2025-04' GROUP BY 1",
     "join_fan_out"),                                              # an expression merging two months
    ("SELECT k.cert_type, COUNT(*) FROM (SELECT j.cert_type, j.tax_year FROM " + TWO_SEVERAL
     + ") k WHERE k.tax_year = 2025 GROUP BY 1", "join_fan_out"),                       # the month not passed on
    # the join aggregated in between: its rows are counted there, before the fixing WHERE
    ("SELECT SUM(s.levy) FROM (SELECT c.cert_type, MIN(t.tax_year) AS tax_year, MIN(c.cert_ym) AS cert_ym, "
     "SUM(t.income_levy) AS levy FROM childcare c JOIN resident_tax t ON c.person_id = t.person_id "
     "GROUP BY c.cert_type) s WHERE s.tax_year = 2025 AND s.cert_ym = '2025-04'", "join_fan_out"),
    # self-joins
    ("SELECT COUNT(*) FROM resident_tax a JOIN resident_tax b ON a.person_id = b.person_id", "self_join"),
    ("SELECT COUNT(*) FROM residents a JOIN (SELECT person_id, age FROM residents) b ON a.person_id = b.person_id",
     "self_join"),
    ("SELECT COUNT(*) FROM residents a JOIN residents b ON a.household_id = b.household_id", "personal_join"),
    # joins on anything else
    ("SELECT COUNT(*) FROM residents a JOIN resident_tax b ON a.block = b.block", "personal_join"),
    ("SELECT COUNT(*) FROM residents a JOIN movements b ON a.person_id = b.household_id", "personal_join"),
    ("SELECT COUNT(*) FROM residents a JOIN resident_tax b ON a.person_id = b.person_id "
     "AND b.income_levy > 1000000", "measure_in_filter"),
    ("SELECT COUNT(*) FROM residents r WHERE r.person_id IN (SELECT person_id FROM resident_tax "
     "WHERE taxable_income > 1e9)", "measure_in_filter"),
    ("SELECT COUNT(*) FROM residents r WHERE r.block = '灘' OR r.person_id IN (SELECT person_id FROM childcare)",
     "subquery_in_expression"),
    ("SELECT COUNT(*) FROM residents r WHERE r.household_id NOT IN (SELECT household_id FROM residents)",
     "subquery_in_expression"),
    ("SELECT COUNT(*) FROM residents r WHERE r.block IN (SELECT block FROM childcare)", "personal_join"),
    # semi-joined columns are not row data; LEFT-joined keys are not contributors
    ("SELECT c.cert_type, COUNT(*) FROM residents r SEMI JOIN childcare c ON r.person_id = c.person_id GROUP BY 1",
     "semi_join_column"),
    ("SELECT COUNT(DISTINCT c.person_id) FROM residents r LEFT JOIN childcare c ON r.person_id = c.person_id",
     "aggregate_argument_not_allowed"),
    # household facts: never a group key, and unit scopes only from their members' own rows
    ("SELECT COUNT(*) FROM (SELECT r.household_id, COUNT(*) AS m FROM residents r WHERE r.household_id IN "
     "(SELECT household_id FROM movements) GROUP BY r.household_id) AS h", "unit_scope_not_allowed"),
    ("SELECT h.household_id, COUNT(*) FROM residents r JOIN (SELECT household_id, COUNT(*) AS m FROM residents "
     "GROUP BY household_id) h ON r.household_id = h.household_id GROUP BY 1", "unit_scope_not_allowed"),
])
def test_join_shapes_refused(guard, inst, sql, code):
    with pytest.raises(QueryRefused) as info:
        guard.query(sql, user=fresh_analyst(inst))
    assert info.value.code == code, info.value


def test_a_bounded_join_weighs_a_person_as_the_view_alone(guard, inst):
    """residents x movements is accepted (one part with several rows per person): a person
    weighs exactly their movements — the answer is the movements view's own row count,
    within the cell-key noise D of the policy."""
    from sekisho.policy import load_instance_policy

    d = load_instance_policy(inst).disclosure.perturbation.max_noise
    user = fresh_analyst(inst)
    joined = guard.query("SELECT m.idou_type, COUNT(*) AS n FROM residents r JOIN movements m "
                         "ON r.person_id = m.person_id GROUP BY 1", user=user)
    true = dict(truth(inst, "SELECT idou_type, COUNT(*) FROM movements GROUP BY 1"))
    got = {row["idou_type"]: row["n"] for row in joined.table.to_pylist() if row["idou_type"] in true}
    assert got and all(abs(n - true[t]) <= d for t, n in got.items()), (got, true, d)


def household_incomes(inst, limit=TARGETS):
    """Households whose 2025 income levy the attacker wants: those of targets unique on
    (chome_code, age), with their exact total."""
    return truth(inst, "WITH u AS (SELECT chome_code, age FROM residents GROUP BY 1, 2 HAVING COUNT(*) = 1) "
                       "SELECT r.chome_code, r.age, SUM(t.income_levy) FROM residents r JOIN u USING (chome_code, age) "
                       "JOIN residents m ON m.household_id = r.household_id JOIN resident_tax t "
                       "ON t.person_id = m.person_id AND t.tax_year = 2025 GROUP BY 1, 2 ORDER BY 1, 2 "
                       f"LIMIT {limit}")


def household_income(oracle, user, chome, age):
    sql = ("SELECT SUM(t.income_levy) AS s FROM resident_tax t JOIN residents r ON r.person_id = t.person_id "
           "WHERE t.tax_year = 2025 AND r.household_id IN (SELECT household_id FROM residents x "
           f"WHERE {on('x', chome, age)})")
    return first_value(oracle, sql, user)


def test_household_income_is_not_recovered(guard, raw, inst):
    found = household_incomes(inst)
    assert len(found) >= 30

    def recovered(oracle) -> int:
        user = fresh_analyst(inst)
        hits = 0
        for chome, age, income in found:
            try:
                got = household_income(oracle, user, chome, age)
            except QueryRefused:
                got = None
            hits += got is not None and abs(got - income) < 1
        return hits

    assert recovered(raw) == len(found)
    assert recovered(guard) < 0.2 * len(found)
