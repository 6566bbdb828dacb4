"""The local adapter: a folder. Atomic by temp file + fsync + rename + fsync of the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from service.storage.port import ObjectStat, Storage, sweep, temp_name


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.local_root = Path(root).resolve()
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.root = str(self.local_root)

    def _temp_path(self, rel: str) -> Path:
        # In the final directory: the rename stays on one filesystem, so it is atomic.
        final = self.local_root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(temp_name(final.name))

    def _publish(self, rel: str, temp: Path, size: int) -> None:
        final = self.local_root / rel
        temp.rename(final)
        fsync_dir(final.parent)

    def open(self, rel: str) -> pa.NativeFile:
        return pa.OSFile(str(self.local_root / rel), "rb")

    def stat(self, rel: str) -> ObjectStat | None:
        try:
            st = (self.local_root / rel).stat()
        except FileNotFoundError:
            return None
        return ObjectStat(size=st.st_size, version=str(st.st_mtime_ns))

    def delete(self, rel: str) -> None:
        (self.local_root / rel).unlink(missing_ok=True)

    def local_path(self, rel: str) -> Path:
        return self.local_root / rel

    def sweep_temporary_files(self, older_than_s: float = 600.0) -> int:
        return sweep(self.local_root, older_than_s)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
