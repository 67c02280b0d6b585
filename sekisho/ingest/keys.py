"""Keyed identifiers computed in bulk: HMAC-SHA256 of every distinct raw identifier.

Large jobs are split between this process and one helper: a plain ``python -I`` child
that reads (key, prefix, values) on stdin and writes the digests on stdout. It shares no
file descriptors with us except those two pipes, imports nothing but ``hmac``, and exits
on end of input, so a killed ingest leaves no helper behind holding its pipes.
(multiprocessing is avoided on purpose: its forkserver re-imports ``__main__``, which for
``python -m sekisho.cli`` would run the CLI again.)
"""

from __future__ import annotations

import hmac
import os
import struct
import subprocess
import sys

# below this many values a second process costs more than it saves
PARALLEL_MIN = 100_000

HELPER = r"""
import hmac, struct, sys
r, w = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = r.read(12)
    if len(head) < 12:
        break
    klen, plen, blen = struct.unpack("<III", head)
    key, prefix, blob = r.read(klen), r.read(plen), r.read(blen)
    d = hmac.digest
    w.write(b"".join([d(key, prefix + v, "sha256") for v in blob.split(b"\n")]))
    w.flush()
"""


def digests(secret: bytes, prefix: bytes, values: list[bytes]) -> bytes:
    """Concatenated 32-byte HMAC-SHA256 digests of ``prefix + value`` for every value
    (values as UTF-8 bytes)."""
    digest = hmac.digest
    return b"".join([digest(secret, prefix + v, "sha256") for v in values])


class DigestPool:
    """This process plus one helper process on a second core (when there is one)."""

    def __init__(self, helpers: int | None = None):
        cores = os.cpu_count() or 1
        want = (1 if cores > 1 else 0) if helpers is None else min(helpers, 1)
        self.proc: subprocess.Popen | None = None
        if want:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", HELPER],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, close_fds=True)

    def digests(self, secret: bytes, prefix: bytes, values: list[bytes]) -> bytes:
        if self.proc is None or len(values) < PARALLEL_MIN:
            return digests(secret, prefix, values)
        half = len(values) // 2
        theirs = values[half:]
        if any(b"\n" in v for v in theirs):   # codes never contain one; stay correct anyway
            return digests(secret, prefix, values)
        blob = b"\n".join(theirs)
        self.proc.stdin.write(struct.pack("<III", len(secret), len(prefix), len(blob))
                              + secret + prefix + blob)
        self.proc.stdin.flush()
        mine = digests(secret, prefix, values[:half])
        need = 32 * len(theirs)
        got = self.proc.stdout.read(need)
        if len(got) != need:
            raise RuntimeError("the digest helper process failed")
        return mine + got

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=30)
            self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> "DigestPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
