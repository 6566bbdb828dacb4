"""The object-store adapter: S3 and S3-compatible stores (MinIO, Ceph, R2) by `AWS_ENDPOINT_URL`.

Configured the way the AWS ecosystem is: `s3://bucket/prefix` plus the standard environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_DEFAULT_REGION`), or an instance role when no keys are set. Reads go through pyarrow's
S3FileSystem (ranged GETs, so a Parquet reader fetches only the row groups it wants); writes and
presigned URLs through boto3. A write is spooled to a local temporary file first and uploaded
with one PUT, or as a multipart upload that is completed only when every part is in (and
aborted otherwise): S3 never shows an object until then, so there is no visible partial object.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from service.storage.port import ObjectStat, Storage, storage_retry, sweep, temp_name

# Below this an upload is one PUT; above it, parts of this size (S3's minimum part is 5 MiB).
MULTIPART_BYTES = 64 * 1024 * 1024


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


class S3Storage(Storage):
    def __init__(self, uri: str, spool_dir: Path | None = None, multipart_bytes: int = MULTIPART_BYTES) -> None:
        parts = urlsplit(uri)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.root = uri
        self.spool_dir = Path(spool_dir or tempfile.gettempdir()) / "teachercache-spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)
        endpoint = endpoint_url()
        # Path-style addressing against a custom endpoint: MinIO and most S3-compatible stores
        # (and a loopback test server) have no per-bucket DNS names.
        addressing = {"addressing_style": "path"} if endpoint else {}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region(),
                                   config=Config(signature_version="s3v4", s3=addressing,
                                                 retries={"max_attempts": 5, "mode": "standard"}))
        self.fs = pafs.S3FileSystem(**pyarrow_options(endpoint))

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _temp_path(self, rel: str) -> Path:
        return self.spool_dir / temp_name(Path(rel).name)

    @storage_retry
    def _publish(self, rel: str, temp: Path, size: int) -> None:
        # upload_file aborts a multipart upload that fails, so no part ever becomes an object.
        self.client.upload_file(str(temp), self.bucket, self.key(rel), Config=self.transfer)

    def open(self, rel: str) -> pa.NativeFile:
        return self.fs.open_input_file(f"{self.bucket}/{self.key(rel)}")

    def stat(self, rel: str) -> ObjectStat | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectStat(size=head["ContentLength"], version=head["ETag"])

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))

    def download_url(self, rel: str, filename: str, media_type: str, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": self.key(rel), "ResponseContentType": media_type,
                  "ResponseContentDisposition": f'attachment; filename="{filename}"'}
        url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return url

    def sweep_temporary_files(self, older_than_s: float = 600.0) -> int:
        return sweep(self.spool_dir, older_than_s)


def pyarrow_options(endpoint: str | None) -> dict[str, Any]:
    """pyarrow's S3FileSystem from the same environment boto3 reads."""
    options: dict[str, Any] = {"region": region()}
    if endpoint:
        parsed = urlsplit(endpoint)
        options["endpoint_override"] = parsed.netloc or endpoint
        options["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the default chain (instance role, profile)
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return options
