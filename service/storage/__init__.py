"""Where shards and files live, behind one port (`Storage`) with a local and an S3 adapter."""

from __future__ import annotations

from pathlib import Path

from service.storage.port import (
    TEMP_SUFFIX,
    ObjectStat,
    ShardCheckFailed,
    Storage,
    StoredShard,
    storage_retry,
)

__all__ = ["TEMP_SUFFIX", "ObjectStat", "ShardCheckFailed", "Storage", "StoredShard", "open_storage",
           "storage_retry"]


def open_storage(uri: str, spool_dir: Path | None = None) -> Storage:
    """A folder path (or file://) is local storage; s3://bucket/prefix an object store.

    Any other scheme is refused at start-up rather than failing at the first download.
    """
    if uri.startswith("s3://"):
        from service.storage.s3 import S3Storage  # boto3 is imported only where it is used

        return S3Storage(uri, spool_dir)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported storage URI scheme in {uri.split('://')[0]!r}://: use a folder or s3://")
    from service.storage.local import LocalStorage

    return LocalStorage(uri)
