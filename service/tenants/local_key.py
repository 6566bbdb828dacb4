"""The embedded stack's key: created on first start so the demo runs with no set-up.

It lives in `<state_dir>/api-key` (mode 0600), for the tenant `local`. A file whose key no
longer works (revoked, or a fresh database) is replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

from service.runtime import Runtime
from service.tenants.service import TenantService

LOCAL_TENANT = "local"


def local_key_path(rt: Runtime) -> Path:
    return rt.settings.state_dir / "api-key"


def ensure_local_key(rt: Runtime) -> tuple[Path, bool]:
    """(where the key is, whether it was created now)."""
    path = local_key_path(rt)
    if path.exists():
        with rt.sessions() as db:
            if TenantService(db).authenticate(path.read_text().strip()) is not None:
                return path, False
    with rt.sessions() as db, db.begin():
        _, key = TenantService(db).create_key(LOCAL_TENANT, label="embedded default")
    write_private(path, key)
    return path, True


def write_private(path: Path, text: str) -> None:
    """Readable by the owner only, and complete or absent (written aside, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text + "\n")
    os.replace(partial, path)
