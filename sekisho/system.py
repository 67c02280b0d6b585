"""What every part of an instance relies on from the operating system: the service
account that owns the instance's files, private file modes, and the instance's clock
(Asia/Tokyo).

These sit below ``sekisho.instance`` and ``sekisho.audit`` so that both can use them
without importing each other (an instance opens its audit log; the audit log writes
private files and Tokyo timestamps). ``sekisho.instance`` re-exports them: that is the
documented place to import them from.
"""

from __future__ import annotations

import os
import pwd
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

SERVICE_ACCOUNT = "sekisho"
TOKYO = ZoneInfo("Asia/Tokyo")


def now_tokyo() -> datetime:
    return datetime.now(TOKYO)


def service_account_ids() -> tuple[int, int] | None:
    """(uid, gid) of the service account, or None when it does not exist."""
    try:
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def secure(path: str | os.PathLike) -> None:
    """Give ``path`` to the service account with private permissions.

    Directories become 0700, files 0600. A no-op for ownership unless we are root
    (a process already running as the service account creates its files as itself).
    Every module that creates a file inside an instance calls this.
    """
    p = Path(path)
    os.chmod(p, 0o700 if p.is_dir() else 0o600)
    ids = service_account_ids()
    if ids is not None and os.geteuid() == 0:
        os.chown(p, *ids)


def secure_tree(root: str | os.PathLike) -> None:
    root = Path(root)
    secure(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            secure(Path(dirpath) / name)
