"""The policy: what may be uploaded, how each raw column is abstracted, how each view
analysts see is built from those abstractions, who may do what, and the
disclosure-control settings.

A policy is YAML data (``policies/*.yaml``), never code. ``load_policy`` validates it
completely and returns frozen dataclasses; every problem raises ``PolicyError`` whose
message names the file, the key path and the problem, e.g.::

    policies/bad.yaml: views.resident_tax.columns.income_levy.bounds: lo (10) must be below hi (5)
    policies/bad.yaml: views.residents.columns.age_band.derive: unknown derivation 'bnd' (known: ...)

Two vocabularies are named here and implemented in ``sekisho.ingest`` (this package only
checks names, parameters and types, so the loader has no dependency on the ingest code;
tests keep each pair of registries equal):

* rules (``sources.*.columns.*.rule``, ``RULES``, implemented in ``sekisho.ingest.rules``):
  what happens to each raw column — the processing standard — and which values each
  rule *releases* to the views (``rule_releases``);
* view definitions (``views.*``, ``DERIVATIONS``, implemented in ``sekisho.ingest.views``
  and ``sekisho.ingest.derivations``): each view's ``source``, the ``joins`` that follow
  the source's declared references, and per column ``from:`` a released value or
  ``derive:`` a named derivation. Every name a view uses is resolved and type-checked
  here, so an upload never meets a view it cannot build and adding a dataset needs no
  Python. The vocabulary is described in ``policies/himeji.yaml`` above ``views:``.

The package sits in the lowest layer (guard, hub, services and ingest all read its
model). Its modules, each a reason to change:

* ``vocabulary`` — the names the language knows (rules, derivations, types, roles, modes);
* ``model`` — the frozen dataclasses, which are also each section's schema (``file_keys``);
* ``checker`` — ``PolicyError`` and reading typed YAML values with key-path errors;
* ``sources``, ``views``, ``derivations``, ``bands`` (band schemes and totals),
  ``disclosure`` — one section's checks each;
* ``loader`` — ``load_policy``: the sections in order, with roles, purposes and store.

Import from ``sekisho.policy``; the modules are its internals.
"""

from __future__ import annotations

from sekisho.policy.checker import PolicyError
from sekisho.policy.loader import load_instance_policy, load_policy
from sekisho.policy.model import (COMPUTED, DP, Alerts, BandClass, Bands, Column, DayOfYear, Derivation,
                                  Disclosure, Dominance, ExactValue, Join, KeyValue, Origin, Perturbation,
                                  Policy, RecordKey, Reference, Released, Role, Source, SourceColumn, Total,
                                  Value, View, rule_releases)
from sekisho.policy.vocabulary import (ALERT_NAMES, AXES, BAND_OUTSIDE, COLUMN_CLASSES, COLUMN_FORMATS, DERIVATIONS,
                                       EPSILON_FLOOR, EXACT_VALUE_RULES, IDENTIFIER, KEPT_TYPE, MESH_NAMES,
                                       MODES, PERIODS, ROLE_NAMES, RULES, SOURCE_TYPES, VIEW_TYPES)

__all__ = [
    "ALERT_NAMES", "AXES", "BAND_OUTSIDE", "COLUMN_CLASSES", "COLUMN_FORMATS", "COMPUTED", "DERIVATIONS", "DP",
    "EPSILON_FLOOR", "EXACT_VALUE_RULES", "IDENTIFIER", "KEPT_TYPE", "MESH_NAMES", "MODES", "PERIODS",
    "ROLE_NAMES", "RULES", "SOURCE_TYPES", "VIEW_TYPES",
    "Alerts", "BandClass", "Bands", "Column", "DayOfYear", "Derivation", "Disclosure", "Dominance",
    "ExactValue", "Join", "KeyValue", "Origin", "Perturbation", "Policy", "PolicyError", "RecordKey", "Reference", "Released", "Role",
    "Source", "SourceColumn", "Total", "Value", "View", "load_instance_policy", "load_policy", "rule_releases",
]
