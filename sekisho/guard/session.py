"""Stage 1 of a query: who is asking, in which role and mode, with which ε.

Everything here is decided from the policy and the instance's role table before any SQL
is parsed or data read, so a refusal at this stage says nothing about the data:
``unknown_user``, ``role_has_no_views``, ``paused_for_review`` (one primary-key read of
the holds table), ``mode_not_allowed`` and ``epsilon_invalid`` (checked fully here,
before the DP ledger is touched, so no ε that passes can fail later in the mechanisms;
an ε given for a mode that takes none is refused rather than ignored). What a role may
do comes from ``sekisho.access.capabilities``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from sekisho.access import capabilities
from sekisho.guard import alerts
from sekisho.guard.errors import QueryRefused
from sekisho.instance import Instance
from sekisho.policy import MODES, Policy
from sekisho.state import role_of


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    mode: str
    epsilon: float | None          # DP only
    condition_influence: bool      # the policy's rule and the role's switch together
    holds: bool                    # whether an alert may put this role on hold
    operator: str | None = None    # who acts for the user (root with --as), for the audit


def role(instance: Instance, policy: Policy, user: object) -> str:
    """The user's role, if it is one of the policy's and has views."""
    name = role_of(instance, user) if isinstance(user, str) and user else None
    if name is None or name not in policy.roles:
        raise QueryRefused("unknown_user", part=str(user)[:64])
    if not capabilities(policy, name).can_query:
        raise QueryRefused("role_has_no_views", part=name)
    return name


def check_epsilon(policy: Policy, epsilon: object) -> float:
    """ε as a float in the policy's [epsilon_per_query_min, epsilon_per_query_max], else
    ``epsilon_invalid`` (bools, strings, None, complex, Decimal, NaN, ±inf, 0, -0.0,
    subnormal values, anything outside the range)."""
    dp = policy.disclosure.dp
    refused = QueryRefused("epsilon_invalid", part=repr(epsilon)[:40])
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, numbers.Real):
        raise refused
    try:
        value = float(epsilon)
    except (TypeError, ValueError, OverflowError):
        raise refused from None
    if not (math.isfinite(value) and dp.epsilon_per_query_min <= value <= dp.epsilon_per_query_max):
        raise refused
    return value


def open_session(instance: Instance, policy: Policy, user: object, *, mode: str | None = None,
                 epsilon: object = None, operator: str | None = None) -> Session:
    """The session of one query, or the refusal that ends it here."""
    name = role(instance, policy, user)
    if alerts.hold_of(instance, user) is not None:
        raise QueryRefused("paused_for_review")
    may = capabilities(policy, name)
    mode = mode or may.default_mode
    if mode not in MODES or mode not in may.modes:
        raise QueryRefused("mode_not_allowed", part=str(mode))
    if mode != "dp" and epsilon is not None:
        raise QueryRefused("epsilon_invalid", part=f"ε with mode {mode}")
    eps = check_epsilon(policy, epsilon) if mode == "dp" else None
    return Session(user=user, role=name, mode=mode, epsilon=eps,
                   condition_influence=policy.disclosure.condition_influence and may.condition_influence,
                   holds=may.alert_holds, operator=operator)


def holds_apply(policy: Policy, role_name: str | None) -> bool:
    """Whether alerts may put a user of ``role_name`` on hold (unknown roles: yes)."""
    if not role_name or role_name not in policy.roles:
        return True
    return capabilities(policy, role_name).alert_holds
