"""The query guard (関所): aggregate-only access to person-level data.

``Guard(instance).query(sql, user=..., mode="threshold"|"dp", epsilon=None)`` returns a
``GuardResult`` (protected Arrow table + disclosure summary) or raises ``QueryRefused``.
See ``analyze`` (static checks), ``rewrite`` (boundary rewrite), ``cells`` (cell SQL),
``protect`` (threshold, cell key, dominance, DP), ``budget`` and ``alerts``.
"""

from sekisho.guard.errors import QueryRefused
from sekisho.guard.guard import Guard, GuardResult

__all__ = ["Guard", "GuardResult", "QueryRefused"]
