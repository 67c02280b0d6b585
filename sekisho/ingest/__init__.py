"""Upload of source exports: validate against the policy, abstract, and load the store.

``ingest(instance, source_dir, user=...)`` does the whole upload; ``Ingestion`` exposes
its audited steps (authorize, open, run) so the CLI can drop privileges in between.
Modules: ``reading`` (files, encodings, CSV), ``validate`` (policy checks),
``rules`` (one unit per abstraction rule), ``keys`` (bulk keyed IDs), ``views`` (the
generic builder of the store tables from the policy's view definitions),
``derivations`` (one unit per derivation a view column may name), ``standard`` (the
processing standard document generated from the policy).

Names are imported lazily so that ``sekisho.ingest.keys`` (loaded by the helper process
that computes digests) does not pull in DuckDB and pyarrow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IngestError": "sekisho.ingest.errors",
    "IngestRefused": "sekisho.ingest.errors",
    "Problem": "sekisho.ingest.errors",
    "Ingestion": "sekisho.ingest.run",
    "IngestResult": "sekisho.ingest.run",
    "ingest": "sekisho.ingest.run",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sekisho.ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
