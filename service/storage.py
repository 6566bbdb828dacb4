"""Shard storage: a local folder by default, or any filesystem pyarrow.fs understands (s3://...).

A shard is written under a temporary name in its final directory, flushed and fsynced,
reopened and checked (Parquet footer, row count), renamed, and its directory fsynced. Only
then may Postgres point at it, so a crash at any moment leaves no trace or a complete shard.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

TEMP_SUFFIX = ".tmp"
CHUNK = 1 << 20


class ShardCheckFailed(OSError):
    """The file read back is not the shard that was written."""


@dataclass(frozen=True)
class StoredShard:
    path: str  # relative to the storage root; never built from user input
    rows: int
    bytes: int
    sha256: str


# Storage errors are worth retrying (a fresh temporary file each time, never in place).
storage_retry = retry(
    retry=retry_if_exception_type(OSError),
    stop=stop_after_attempt(4),
    wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
    reraise=True,
)


class Storage:
    def __init__(self, uri: str) -> None:
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.local_root: Path | None = None
        else:
            self.local_root = Path(uri).resolve()
            self.local_root.mkdir(parents=True, exist_ok=True)
            self.fs, self.root = pafs.LocalFileSystem(), str(self.local_root)
        self._verified: set[tuple[str, int, int]] = set()

    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        return self.local_root / rel if self.local_root else None

    @storage_retry
    def write_table(self, rel: str, table: pa.Table, metadata: dict[bytes, bytes]) -> StoredShard:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        self.fs.create_dir(self.full(rel).rsplit("/", 1)[0], recursive=True)
        if self.local_root is None:
            pq.write_table(table, self.full(rel), filesystem=self.fs, compression="zstd")
        else:
            self._write_local_atomically(rel, table)
        return self._check(rel, table.num_rows)

    def _write_local_atomically(self, rel: str, table: pa.Table) -> None:
        final = self.local_root / rel
        temp = final.with_name(f"{final.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            with temp.open("wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            self._check_file(temp, table.num_rows)
            temp.rename(final)
        except BaseException:
            temp.unlink(missing_ok=True)  # an fsync or check error means a rewrite, never reuse
            raise
        fsync_dir(final.parent)

    def _check(self, rel: str, rows: int) -> StoredShard:
        with self.fs.open_input_file(self.full(rel)) as f:
            size = f.size()
            metadata = pq.ParquetFile(f).metadata
        if metadata.num_rows != rows:
            raise ShardCheckFailed(f"{rel}: {metadata.num_rows} rows read back, {rows} written")
        return StoredShard(path=rel, rows=rows, bytes=size, sha256=self.sha256(rel))

    @staticmethod
    def _check_file(path: Path, rows: int) -> None:
        read_back = pq.ParquetFile(path).metadata.num_rows  # parses the footer
        if read_back != rows:
            raise ShardCheckFailed(f"{path.name}: {read_back} rows read back, {rows} written")

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def open(self, rel: str) -> BinaryIO:
        return self.fs.open_input_file(self.full(rel))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.full(rel), filesystem=self.fs, columns=columns)

    def sweep_temporary_files(self, older_than_s: float = 600.0) -> int:
        """Remove temporary files a crashed writer left behind (local storage only).

        Only files untouched for `older_than_s`: a live writer's temporary file is seconds old.
        """
        if self.local_root is None:
            return 0
        cutoff = time.time() - older_than_s
        orphans = [p for p in self.local_root.rglob(f"*{TEMP_SUFFIX}") if p.stat().st_mtime < cutoff]
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        return len(orphans)

    def verified_local_path(self, rel: str, size: int, sha256: str) -> Path:
        """The shard's local file, after checking it is the one indexed (size, then sha256).

        A file is hashed once per (size, mtime); a damaged file raises ShardCheckFailed.
        """
        path = self.local_path(rel)
        if path is None or not path.exists():
            raise ShardCheckFailed(f"{rel} is missing")
        stat = path.stat()
        if stat.st_size != size:
            raise ShardCheckFailed(f"{rel} is {stat.st_size} bytes, {size} indexed")
        stamp = (rel, stat.st_size, stat.st_mtime_ns)
        if stamp not in self._verified:
            if self.sha256(rel) != sha256:
                raise ShardCheckFailed(f"{rel} does not match its indexed sha256")
            self._verified.add(stamp)
        return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
