"""Which audit entries a reviewer asked for: the query parameters of the audit review
pages (person, event type, outcome, period, limit), validated, and the entries they select.

Apart from the tornado handlers (``sekisho.services.audit_review``) so that the
validation — the only place a reviewer's input reaches the trail — is read and tested
on its own: a bad parameter raises ``FilterError`` naming it (shown as a 400 page).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlencode

from sekisho.errors import SekishoError
from sekisho.instance import Instance

OUTCOME_LABELS = {"ok": "成功", "refused": "拒否", "denied": "不許可", "failed": "失敗"}
DEFAULT_LIMIT = 200
MAX_LIMIT = 5000
# any name that can appear in the trail (failed logins record what was typed); no control characters
NAME_FILTER = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
TYPE_FILTER = re.compile(r"^[a-z][a-z.-]{0,39}$")


class FilterError(SekishoError, ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Filters:
    user: str | None = None
    type: str | None = None
    outcome: str | None = None
    since: date | None = None
    until: date | None = None
    limit: int = DEFAULT_LIMIT

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "type": self.type, "outcome": self.outcome,
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None}

    def query_string(self) -> str:
        return urlencode({k: v for k, v in self.as_dict().items() if v})


def _date(param: str, value: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise FilterError(param, f"expected a date YYYY-MM-DD, got {value[:20]!r}") from None


def parse_filters(args: dict[str, str]) -> Filters:
    """Validate the query parameters; a bad one raises FilterError naming it."""
    user = (args.get("user") or "").strip() or None
    if user is not None and not NAME_FILTER.match(user):
        raise FilterError("user", "at most 64 characters, no control characters")
    type_ = (args.get("type") or "").strip() or None
    if type_ is not None and not TYPE_FILTER.match(type_):
        raise FilterError("type", f"not an event type: {type_[:40]!r}")
    outcome = (args.get("outcome") or "").strip() or None
    if outcome is not None and outcome not in OUTCOME_LABELS:
        raise FilterError("outcome", f"expected one of {', '.join(OUTCOME_LABELS)}")
    since, until = _date("since", args.get("since", "")), _date("until", args.get("until", ""))
    if since and until and since > until:
        raise FilterError("since", "the period starts after it ends")
    raw_limit = args.get("limit") or str(DEFAULT_LIMIT)
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise FilterError("limit", f"expected a number from 1 to {MAX_LIMIT}")
    return Filters(user=user, type=type_, outcome=outcome, since=since, until=until, limit=int(raw_limit))


def select(instance: Instance, filters: Filters) -> list[dict[str, Any]]:
    return list(instance.audit.entries(user=filters.user, type=filters.type, outcome=filters.outcome,
                                       since=filters.since, until=filters.until))
