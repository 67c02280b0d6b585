"""Upload of source exports: validate against the policy, abstract, and load the store.

``ingest(instance, source_dir, user=...)`` does the whole upload; ``Ingestion`` exposes
its audited steps (authorize, open, run) so the CLI can drop privileges in between.
Modules: ``reading`` (files, encodings, CSV), ``validate`` (policy checks),
``rules`` (one unit per abstraction rule), ``views`` (the store tables), ``standard``
(the processing standard document generated from the policy).
"""

from sekisho.ingest.errors import IngestError, IngestRefused, Problem
from sekisho.ingest.run import Ingestion, IngestResult, ingest

__all__ = ["IngestError", "IngestRefused", "Problem", "Ingestion", "IngestResult", "ingest"]
