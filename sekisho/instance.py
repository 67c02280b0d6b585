"""A Sekisho instance: the service account's private directory.

Layout (directories 0700, files 0600, owned by the ``sekisho`` service account)::

    HOME/
      config.yaml      instance settings (store backend, hub address, policy set)
      secret.key       key for keyed IDs and record keys; generated once, never printed
      audit.key        key that seals each audit entry (an editor without it cannot re-seal)
      policies/        the policy set in force (copied at init; its digest is the policy version)
      store/           the store: immutable snapshots plus a CURRENT pointer (sekisho.store)
      audit/           the hash-chained audit log (sekisho.audit)
      state.sqlite     users and roles, privacy budgets (sekisho.state)
      published/       published report HTML (sekisho.reports)

Analysts' OS users must not be able to read any of it; the hub issue's isolation
tests rely on that.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from sekisho.audit import AuditLog
from sekisho.errors import SekishoError
from sekisho.resources import resource_dir
# the service account, private files and the clock live below the audit log (which uses
# them too); this module is where the rest of Sekisho imports them from
from sekisho.system import (SERVICE_ACCOUNT, TOKYO, now_tokyo, secure, secure_tree,  # noqa: F401
                            service_account_ids)

DEFAULT_HOME = "/var/lib/sekisho"

DEFAULT_CONFIG: dict[str, Any] = {
    "store": {"backend": "duckdb"},
    "hub": {"ip": "127.0.0.1", "port": 8000},
    "policy": {"file": "himeji.yaml"},
}


class InstanceError(SekishoError):
    """The instance is missing, incomplete or not usable."""


def default_home() -> Path:
    return Path(os.environ.get("SEKISHO_HOME") or DEFAULT_HOME)


def ensure_service_account() -> tuple[int, int] | None:
    """Create the ``sekisho`` system user when running as root and it is missing."""
    ids = service_account_ids()
    if ids is not None or os.geteuid() != 0:
        return ids
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT],
        check=True, capture_output=True,
    )
    return service_account_ids()


def drop_to_service_account() -> None:
    """Irreversibly switch this process to the service account (when root).

    CLI commands that write the store call this after resolving who the caller is,
    so every file they create is owned by the service account.
    """
    ids = service_account_ids()
    if os.geteuid() != 0 or ids is None:
        return
    uid, gid = ids
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.environ["HOME"] = "/nonexistent"
    os.environ["USER"] = os.environ["LOGNAME"] = SERVICE_ACCOUNT


def _write_private(path: Path, data: bytes) -> None:
    """Write a file that is 0600 from its first byte (no window where it is readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    secure(path)


@dataclass
class Instance:
    home: Path
    config: dict[str, Any] = field(default_factory=dict)

    # ---- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.home / "config.yaml"

    @property
    def secret_path(self) -> Path:
        return self.home / "secret.key"

    @property
    def audit_key_path(self) -> Path:
        return self.home / "audit.key"

    @property
    def policy_dir(self) -> Path:
        return self.home / "policies"

    @property
    def policy_path(self) -> Path:
        return self.policy_dir / self.config["policy"]["file"]

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    @property
    def state_path(self) -> Path:
        return self.home / "state.sqlite"

    @cached_property
    def state_file(self) -> str:
        """``state_path`` as a string: the key of the per-request role lookup's connection."""
        return str(self.state_path)

    @property
    def published_dir(self) -> Path:
        return self.home / "published"

    # ---- lifecycle ---------------------------------------------------------
    @classmethod
    def create(cls, home: str | os.PathLike | None = None, *, policy_dir: Path | None = None,
               exist_ok: bool = False) -> "Instance":
        """Create a new instance directory (``sekisho init``)."""
        home = Path(home) if home else default_home()
        if (home / "config.yaml").exists():
            if exist_ok:
                return cls.open(home)
            raise InstanceError(f"an instance already exists at {home}")
        ensure_service_account()
        old_umask = os.umask(0o077)
        try:
            home.mkdir(parents=True, exist_ok=True)
            for sub in ("policies", "store", "audit", "published"):
                (home / sub).mkdir(exist_ok=True)
            src = Path(policy_dir) if policy_dir else resource_dir("policies")
            for f in sorted(src.glob("*.yaml")):
                shutil.copyfile(f, home / "policies" / f.name)
            _write_private(home / "secret.key", secrets.token_hex(32).encode())
            _write_private(home / "audit.key", secrets.token_hex(32).encode())
            config = {**DEFAULT_CONFIG, "created_at": now_tokyo().isoformat(timespec="seconds")}
            _write_private(home / "config.yaml",
                           yaml.safe_dump(config, allow_unicode=True, sort_keys=False).encode())
            secure_tree(home)
        finally:
            os.umask(old_umask)
        inst = cls.open(home)
        inst.audit.append("instance.init", user=_caller_name(), outcome="ok",
                          summary=f"instance created at {home}",
                          details={"home": str(home), "policy_version": inst.policy_version})
        return inst

    @classmethod
    def open(cls, home: str | os.PathLike | None = None) -> "Instance":
        home = Path(home) if home else default_home()
        cfg_path = home / "config.yaml"
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InstanceError(
                f"no Sekisho instance at {home} (run `sekisho init --home {home}` first)") from None
        except PermissionError:
            raise InstanceError(f"permission denied reading the instance at {home}") from None
        config = yaml.safe_load(text) or {}
        merged = {**DEFAULT_CONFIG, **config}
        return cls(home=home, config=merged)

    # ---- services ----------------------------------------------------------
    @cached_property
    def secret(self) -> bytes:
        """Key for keyed identifiers and record keys. Never log or print it."""
        return bytes.fromhex(self.secret_path.read_text().strip())

    @cached_property
    def audit_key(self) -> bytes:
        return bytes.fromhex(self.audit_key_path.read_text().strip())

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.audit_dir, key=self.audit_key)

    @property
    def policy_version(self) -> str:
        """Digest of the policy files in force (recorded with every upload)."""
        h = hashlib.sha256()
        for f in sorted(self.policy_dir.glob("*.yaml")):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return "sha256:" + h.hexdigest()[:16]


def _caller_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
