"""Pairs within one request (issue 15, class 4): the ``differencing`` alert per cell
(``sekisho.guard.cell_pairs``) comes after the answer, so a query holding both halves of
a pair — 78 of them as one UNION ALL named 40 persons at once — would be answered whole
before it. Two defences, both in threshold mode with condition influence:

* from the text, before anything runs: two boundaries that differ only in the constants
  of ranges (``>= v`` beside ``> v``; cut points a value apart) are refused
  (``one_shape_each``, ``repeated_shape``);
* after the cells scan, before the answer leaves: the request's other boundaries of one
  family are digested as ``cell_pairs`` records releases, and their close pairs checked
  on the store (``refuse_pairs_within``): a pair that differs in a released cell by
  1..k-1 is refused with the alert and, under a pausing policy, the hold. Only requests
  with two boundaries of one family pay for it; the store is read only for close pairs.
"""

from __future__ import annotations

import hashlib

from sqlglot import exp

from sekisho.guard.cell_pairs import (MAX_CHECKS, MAX_WITHIN, CellPair, candidates, confirm, differing, digest,
                                      family, related)
from sekisho.guard.errors import QueryRefused
from sekisho.guard.session import holds_apply
from sekisho.instance import Instance


def within_request(plan, released, cursor, k: int) -> list[tuple[CellPair, int]]:
    """The pairs of one request's own boundaries of one family that differ in a cell both
    release by 1..k-1 contributors, one holding the other's persons (checked on the store
    with ``cursor`` before the answer leaves): in one query the alert after the answer
    would come when every pair was answered. Only requests with two boundaries of one
    family are digested; only close ones are checked (more than ``MAX_WITHIN``: all
    taken as differing)."""
    rows = [(_family_of(bp), i) for i, bp in enumerate(plan.boundaries)
            if bp.row is not None and i < len(released.defined) and released.defined[i] is not None]
    rows = [(f, i) for f, i in rows if sum(related(f, g) for g, _ in rows) > 1]
    if not rows:
        return []
    digests = {i: digest(released.cell_keys[i], len(plan.boundaries[i].group_keys), k) for _, i in rows}
    pairs = []
    for a, (fa, i) in enumerate(rows):
        earlier = [(j, released.defined[j][1], digests[j], len(plan.boundaries[j].group_keys))
                   for fb, j in rows[:a] if related(fa, fb) and digests[j] is not None]
        if digests[i] is not None and earlier:
            pairs += candidates(released.defined[i][1], digests[i], len(plan.boundaries[i].group_keys), earlier,
                                k)[:MAX_CHECKS]
    if len(pairs) > MAX_WITHIN:
        # more close pairs than are checked: refused as if they differed (fail closed)
        return [(pair, 0) for pair in pairs]
    verified = []
    for pair in pairs:
        cells = differing(cursor, pair, k)
        if cells:
            verified.append((pair, cells))
    return verified


def _family_of(bp) -> str:
    """``family`` of a boundary's row SELECT, kept on the cached plan (a repeated query
    does not walk its tree again on the answer's path)."""
    memo = getattr(bp, "_family", None)
    if memo is None:
        memo = family(bp.row)
        object.__setattr__(bp, "_family", memo)
    return memo


def refuse_pairs_within(instance: Instance, policy, plan, released, snap, session, request_seq: int,
                        audit_alerts) -> None:
    """Refuse (``repeated_shape``) a request whose own boundaries are a differencing pair
    (``within_request``), after raising the ``differencing`` alert (audited with the
    recorder's ``audit_alerts``; the user held if the policy pauses): the refusal says a
    cell of the pair differs, so it costs a review as the alert does."""
    cur = snap.cursor()
    try:
        verified = within_request(plan, released, cur, policy.disclosure.k)
    finally:
        cur.close()
    if not verified:
        return
    found = confirm(instance, policy.disclosure.alerts, user=session.user, fingerprint=plan.fingerprint,
                    verified=verified, raised_by=request_seq, pause=holds_apply(policy, session.role))
    audit_alerts(found, session.user, session.role, request_seq)   # the recorder's, as for every alert
    raise QueryRefused("repeated_shape", part="aggregations of one family")


_RANGES = (exp.GT, exp.GTE, exp.LT, exp.LTE)


def range_shape(tree) -> str:
    """``shape`` with only the constants of ranges left out (``>``, ``>=``, ``<``, ``<=``,
    BETWEEN; their operators made one): parts that differ there can hold one another's
    persons and a few more; parts that differ in an equality (``sex = '男'`` and ``= '女'``)
    or a modulus cannot."""
    def literal(node):
        return exp.Placeholder() if isinstance(node, exp.Literal) else node

    def ranges(node):
        if isinstance(node, _RANGES):
            return exp.Anonymous(this="range", expressions=sorted([literal(node.left), literal(node.right)],
                                                                 key=lambda e: e.sql()))
        if isinstance(node, exp.Between):
            return exp.Anonymous(this="range", expressions=[node.this, exp.Placeholder(), exp.Placeholder()])
        return node
    blank = tree.copy().transform(ranges)
    return hashlib.blake2b(blank.sql(dialect="duckdb").encode(), digest_size=16).hexdigest()


def one_shape_each(plan) -> None:
    """Refuse (``repeated_shape``) a query two of whose boundaries differ only in the
    constants of ranges (``range_shape``): ``>= v`` and ``> v`` as two parts of a UNION ALL
    or two CTEs joined above them. Decided from the text; kept on the cached plan. (Other
    boundaries of one family are checked on the store before the answer:
    ``refuse_pairs_within``.)"""
    repeated = getattr(plan, "_repeated_shape", None)
    if repeated is None:
        seen: set[str] = set()
        repeated = ""
        for number, bp in enumerate(plan.boundaries, start=1):
            if bp.row is None:
                continue
            s = range_shape(bp.row)
            if s in seen:
                repeated = f"aggregation {number}"
                break
            seen.add(s)
        object.__setattr__(plan, "_repeated_shape", repeated)
    if repeated:
        raise QueryRefused("repeated_shape", part=repeated)
