"""The storage port: what the service needs from wherever shards and files live.

Every write goes the same way: the bytes are written to a local temporary file (flushed and
fsynced), checked (a Parquet footer and its row count), hashed, and only then made visible
under their final name in one step the adapter guarantees atomic: a rename on a local disk,
a single PUT or a completed multipart upload on an object store. Only then may Postgres point
at it, so a crash at any moment leaves no trace or a complete, indexed object.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

TEMP_SUFFIX = ".tmp"
CHUNK = 1 << 20


class ShardCheckFailed(OSError):
    """The object read back is not the one that was written (or indexed)."""


@dataclass(frozen=True)
class StoredShard:
    path: str  # relative to the storage root; never built from user input
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ObjectStat:
    size: int
    version: str  # changes whenever the object does: mtime_ns locally, the ETag on S3


# Storage errors are worth retrying (a fresh temporary file each time, never in place).
storage_retry = retry(
    retry=retry_if_exception_type(OSError),
    stop=stop_after_attempt(4),
    wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
    reraise=True,
)

# Writes what is to be stored into the open temporary file; returns its row count (Parquet)
# or None (any other bytes).
Fill = Callable[[BinaryIO], "int | None"]


class Storage(ABC):
    """One storage root. Paths given to it are relative and minted by the service."""

    root: str  # for logs only: a response never shows it

    # adapter operations

    @abstractmethod
    def _temp_path(self, rel: str) -> Path:
        """A fresh local temporary file for an object that will be `rel`."""

    @abstractmethod
    def _publish(self, rel: str, temp: Path, size: int) -> None:
        """Make the finished temporary file visible as `rel`, all at once or not at all."""

    @abstractmethod
    def open(self, rel: str) -> pa.NativeFile:
        """A random-access reader (seek + read: range requests on an object store)."""

    @abstractmethod
    def stat(self, rel: str) -> ObjectStat | None:
        """Size and version of `rel`, None when it does not exist."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove `rel` (no error when it is already gone)."""

    def local_path(self, rel: str) -> Path | None:
        """The object as a local file, when it is one (served with sendfile)."""
        return None

    def download_url(self, rel: str, filename: str, media_type: str, expires_s: int) -> str | None:
        """A short-lived URL a client may fetch the object from directly, when the store has one."""
        return None

    def sweep_temporary_files(self, older_than_s: float = 600.0) -> int:
        """Remove temporary files a crashed writer left behind; how many."""
        return 0

    # the same for every adapter

    def write(self, rel: str, fill: Fill) -> StoredShard:
        """Write an object through `fill`, check it, publish it atomically; its index entry."""
        temp = self._temp_path(rel)
        try:
            with temp.open("wb") as f:
                rows = fill(f)
                f.flush()
                os.fsync(f.fileno())
            if rows is not None:
                check_parquet(temp, rows)
            size, digest = temp.stat().st_size, file_sha256(temp)
            self._publish(rel, temp, size)
        finally:
            temp.unlink(missing_ok=True)  # an fsync or check error means a rewrite, never reuse
        self._check_published(rel, size)
        return StoredShard(path=rel, rows=rows or 0, bytes=size, sha256=digest)

    @storage_retry
    def write_table(self, rel: str, table: pa.Table, metadata: dict[bytes, bytes], **options: Any) -> StoredShard:
        """One Parquet file of `table` (zstd unless `options`, pq.write_table's, say otherwise)."""
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})

        def fill(f: BinaryIO) -> int:
            pq.write_table(table, f, **{"compression": "zstd", **options})
            return int(table.num_rows)

        return self.write(rel, fill)

    @storage_retry
    def write_bytes(self, rel: str, data: bytes) -> StoredShard:
        def fill(f: BinaryIO) -> None:
            f.write(data)

        return self.write(rel, fill)

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as f:
            data: bytes = f.read()
            return data

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.open(rel) as f:
            return pq.read_table(f, columns=columns)

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def verify(self, rel: str, size: int, sha256: str, full: bool = True) -> ObjectStat:
        """Check `rel` is the object indexed: its size, then (when `full`) its sha256.

        An object is hashed once per version in this process; a missing or damaged one raises
        ShardCheckFailed.
        """
        stat = self.stat(rel)
        if stat is None:
            raise ShardCheckFailed(f"{rel} is missing")
        if stat.size != size:
            raise ShardCheckFailed(f"{rel} is {stat.size} bytes, {size} indexed")
        stamp = (rel, stat.size, stat.version)
        if full and stamp not in self._verified_versions():
            if self.sha256(rel) != sha256:
                raise ShardCheckFailed(f"{rel} does not match its indexed sha256")
            self._verified_versions().add(stamp)
        return stat

    def _verified_versions(self) -> set[tuple[str, int, str]]:
        if not hasattr(self, "_verified"):
            self._verified: set[tuple[str, int, str]] = set()
        return self._verified

    def _check_published(self, rel: str, size: int) -> None:
        stat = self.stat(rel)
        if stat is None or stat.size != size:
            raise ShardCheckFailed(f"{rel}: {stat.size if stat else 'nothing'} published, {size} bytes written")


def check_parquet(path: Path, rows: int) -> None:
    try:
        read_back = pq.ParquetFile(path).metadata.num_rows  # parses the footer
    except pa.ArrowException as exc:
        raise ShardCheckFailed(f"{path.name}: not a readable Parquet file ({exc})") from exc
    if read_back != rows:
        raise ShardCheckFailed(f"{path.name}: {read_back} rows read back, {rows} written")


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def temp_name(name: str) -> str:
    return f"{name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"


def sweep(folder: Path, older_than_s: float) -> int:
    """Only files untouched for `older_than_s`: a live writer's temporary file is seconds old."""
    if not folder.exists():
        return 0
    cutoff = time.time() - older_than_s
    orphans = [p for p in folder.rglob(f"*{TEMP_SUFFIX}") if p.stat().st_mtime < cutoff]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return len(orphans)
