"""The names the policy language knows: column classes and types, the rules of the
processing standard, the derivations, modes, roles and alerts, and the limits a policy
must keep.

They sit in a module of their own, importing nothing, because both the loader (which
checks a policy against them) and the code that implements them (``sekisho.ingest``,
``sekisho.guard``) read them; tests keep each registry equal to its implementation, and
``ROLE_NAMES`` equal to ``sekisho.access.ROLES`` (the loader sits below the access
module and cannot import it).
"""

from __future__ import annotations

COLUMN_CLASSES = ("privacy_unit", "linkage", "dimension", "measure", "sensitive_measure")
VIEW_TYPES = ("string", "integer", "boolean", "float")
COLUMN_FORMATS = ("YYYY-MM",)   # formats the ingest guarantees for every non-NULL value
SOURCE_TYPES = ("code", "text", "date", "integer", "decimal")
# the type a raw value kept as it is has in a view; "date" is no view type: a
# day-precision date can reach a view only through a rule or derivation that coarsens it
KEPT_TYPE = {"code": "string", "text": "string", "date": "date", "integer": "integer", "decimal": "float"}
# rule name -> parameters it accepts (name -> required?)
RULES: dict[str, dict[str, bool]] = {
    "drop": {},
    "keep": {},
    "keyed_id": {"as": True, "namespace": True},
    "year_month": {"as": True},
    "birth_topcoded": {"top_age": True},
    "code_label": {"as": False, "labels": True},
    "locate": {"chome": True, "carry": True, "prefix": False},
    "position": {"axis": True},
    "record_key": {},
}
# rules after which a raw column's exact value stays inside the ingest's working database
# (never in the store) for the derivations that need it: the age at an event is computed
# on exact dates, a record key on a record's identity
EXACT_VALUE_RULES = ("keep", "year_month", "birth_topcoded", "record_key")
# the JIS X 0410 mesh codes the locate rule releases (1km, 500m, 250m)
MESH_NAMES = ("mesh1km", "mesh500m", "mesh250m")
# the coordinates of an address master's representative points (rule position)
AXES = ("latitude", "longitude")
# derivation name -> parameters it accepts (name -> required?); what each one computes
# is said by its checker in sekisho.policy.derivations and its SQL in sekisho.ingest.derivations
DERIVATIONS: dict[str, dict[str, bool]] = {
    "first_of": {"of": True},
    "is_empty": {"of": True},
    "year": {"of": True},
    "month": {"of": True},
    "fiscal_year": {"of": True, "first_month": True},
    "band": {"of": True, "width": True, "top": True},
    "age": {"born": True, "at": True},
    "case": {"when": True, "then": True, "else": False},
    "extract_month": {},
    "total": {"total": True, "at": True},
    "bands": {"of": True, "bands": True},
}
# what the bands derivation gives a value no class of its scheme holds (below the first
# class): no label may be it and no domain lists it, so the upload is refused
BAND_OUTSIDE = "<outside bands>"
MODES = ("threshold", "dp")
PERIODS = ("month",)
# lowest disclosure.dp.epsilon_per_query_min a policy may set: a query's ε is split between
# its aggregates, and a share near the float limits breaks the DP mechanisms (diffprivlib's
# Snapping refuses ε <= 2 machine epsilons, Geometric noise overflows int64 near 1e-16);
# 1e-6 leaves room for millions of shares
EPSILON_FLOOR = 1e-6
ROLE_NAMES = ("steward", "analyst", "admin", "manager", "reports")
IDENTIFIER = r"[a-z][a-z0-9_]*"
# the alerts disclosure.alerts.pause_on may name (raised by sekisho.guard.alerts)
ALERT_NAMES = ("bulk", "near_duplicate", "refusals", "differencing", "decomposition", "upload_differencing",
               "upload_decomposition")
