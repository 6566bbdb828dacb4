"""The storage port's two adapters: atomic writes, range opens, presigned URLs, no partial objects."""

from __future__ import annotations

import os

import httpx
import pyarrow as pa
import pytest

from service.storage import ShardCheckFailed, open_storage
from service.storage.s3 import S3Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_server").new_bucket()
    return open_storage(f"s3://{bucket}/prefix", spool_dir=tmp_path / "spool")


def test_a_table_is_written_checked_and_read_back_by_ranges(storage):
    table = pa.table({"x": list(range(1000))})
    stored = storage.write_table("jobs/j/part-00000.parquet", table, {b"k": b"v"})
    assert stored.rows == 1000 and storage.stat(stored.path).size == stored.bytes
    assert storage.sha256(stored.path) == stored.sha256
    assert storage.read_table(stored.path).column("x").to_pylist() == list(range(1000))
    whole = storage.read_bytes(stored.path)
    with storage.open(stored.path) as f:  # a ranged read, not a whole download
        f.seek(100)
        assert f.read(50) == whole[100:150]
    storage.verify(stored.path, stored.bytes, stored.sha256)


def test_a_failed_write_leaves_no_object_and_no_temporary_file(storage, tmp_path):
    def fill(f):
        f.write(b"PAR1" + os.urandom(1000))
        raise OSError("disk went away half-way")

    with pytest.raises(OSError):
        storage.write("jobs/j/part-00000.parquet", fill)
    assert storage.stat("jobs/j/part-00000.parquet") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_file_that_is_not_the_parquet_written_is_never_published(storage):
    with pytest.raises(ShardCheckFailed):
        storage.write("jobs/j/part-00000.parquet", lambda f: f.write(b"not parquet") and 5)
    assert storage.stat("jobs/j/part-00000.parquet") is None


def test_a_damaged_object_fails_verification(storage):
    stored = storage.write_table("jobs/j/part-00000.parquet", pa.table({"x": [1, 2, 3]}), {})
    storage.write_bytes(stored.path, b"x" * stored.bytes)  # same size, other bytes
    with pytest.raises(ShardCheckFailed, match="sha256"):
        storage.verify(stored.path, stored.bytes, stored.sha256)
    storage.delete(stored.path)
    with pytest.raises(ShardCheckFailed, match="missing"):
        storage.verify(stored.path, stored.bytes, stored.sha256)


def test_an_upload_interrupted_mid_way_leaves_no_visible_object(s3_server, tmp_path):
    """A multipart upload whose parts after the first fail (every retry) is aborted: no object,
    no pending upload."""
    bucket = s3_server.new_bucket()
    storage = S3Storage(f"s3://{bucket}/p", spool_dir=tmp_path, multipart_bytes=5 * 1024 * 1024)
    parts = []

    def fail_second_part(**kwargs):
        parts.append(1)
        if len(parts) >= 2:
            raise ConnectionResetError("connection dropped mid-upload")

    storage.client.meta.events.register("before-send.s3.UploadPart", fail_second_part)
    data = os.urandom(12 * 1024 * 1024)  # three parts
    with pytest.raises(Exception):  # noqa: B017 -- whichever botocore raises; what matters is what is left
        storage.write_bytes("files/big.bin", data)
    assert len(parts) >= 2  # it really was a multipart upload, cut after its first part
    assert s3_server.keys(bucket) == []
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    storage.client.meta.events.unregister("before-send.s3.UploadPart", fail_second_part)
    stored = storage.write_bytes("files/big.bin", data)  # and the next attempt publishes it whole
    assert storage.read_bytes(stored.path) == data


def test_a_presigned_url_serves_the_object_with_ranges(s3_server, tmp_path):
    storage = open_storage(f"s3://{s3_server.new_bucket()}/p", spool_dir=tmp_path)
    stored = storage.write_bytes("files/a.bin", os.urandom(10_000))
    url = storage.download_url(stored.path, "a.bin", "application/octet-stream", expires_s=60)
    assert url.startswith(s3_server.endpoint) and "X-Amz-Signature" in url
    response = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == storage.read_bytes(stored.path)[10:20]


def test_an_unknown_scheme_is_refused_at_start_up():
    with pytest.raises(ValueError, match="gs"):
        open_storage("gs://bucket/prefix")
