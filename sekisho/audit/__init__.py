"""The audit trail: one append-only, hash-chained, sealed log of security events.

Each line of ``audit.jsonl`` is a JSON object::

    {"seq": 17, "ts": "2026-11-23T14:05:01.123+09:00", "type": "query",
     "user": "tanaka", "role": "analyst", "outcome": "ok", "summary": "...",
     "details": {...}, "prev": "<hash of entry 16>", "hash": "<sha256 of this entry>",
     "mac": "<HMAC-SHA256 of hash under the instance's audit key>"}

* ``hash`` covers every other field (canonical JSON), and ``prev`` links to the
  previous entry, so an edited, inserted, deleted or reordered entry breaks the chain.
* ``mac`` seals each hash with a key only the service account holds, so an insider who
  edits an entry cannot simply recompute the chain from there on.
* ``audit.head`` records the last sequence number and hash, so cutting entries off the
  end is detected too. For a guarantee against someone holding the key, record the head
  outside the instance (``sekisho audit head``) and pass it to ``verify``. It holds two
  fixed-size slots of 512 bytes (one per disk sector), each ``seq hash mac`` with its own
  CRC, so a write torn by a crash damages at most one slot; ``verify`` reports a damaged
  slot and checks the log against the intact one.

The package's modules, each one side of the trail:

* ``chain`` — the on-disk format (entry hashing, head slots, the log's last entry);
* ``log`` — ``AuditLog`` and ``AuditError``: appending under the lock, durably;
* ``reading`` — ``AuditTrail``: entries filtered, the head, CSV export;
* ``verify`` — walking the chain and the head file, naming every break;
* ``denials`` — ``DenialLog``: denied requests (401/403) on record, aggregated per
  source and minute so that a flood cannot swamp the chain.

Import from ``sekisho.audit``; the modules are its internals.
"""

from __future__ import annotations

from sekisho.audit.chain import GENESIS, HEAD_MAGIC, HEAD_NAME, HEAD_SLOT, LOCK_NAME, LOG_NAME, _head_slot, entry_hash
from sekisho.audit.denials import DENIAL_TYPE, LOGIN_SERVICE, Denial, DenialLog, credential_digest
from sekisho.audit.log import AuditError, AuditLog
from sekisho.audit.reading import CSV_FIELDS, AuditTrail, to_csv
from sekisho.audit.verify import Problem, VerifyResult

__all__ = [
    "CSV_FIELDS", "GENESIS", "HEAD_MAGIC", "HEAD_NAME", "HEAD_SLOT", "LOCK_NAME", "LOG_NAME",
    "DENIAL_TYPE", "LOGIN_SERVICE", "AuditError", "AuditLog", "AuditTrail", "Denial", "DenialLog", "Problem", "VerifyResult",
    "_head_slot", "credential_digest", "entry_hash", "to_csv",
]
