"""A real job shard without running a worker: a queued job, a Parquet file written through
the service's storage, and its row in the shard index, as the finalizer would leave them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from service.ids import new_id
from service.models import Shard
from service.results.repository import ResultRepository


@dataclass(frozen=True)
class IndexedShard:
    id: str
    url: str  # the path part: /v1/shards/<id>
    path: str  # where it is, relative to the storage root (what a caller must never see)
    content: bytes
    sha256: str

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


def add_job_shard(api, rt, payload_bytes: int = 20_000) -> IndexedShard:
    job = api.post("/v1/jobs", json={"requests": [{"prompt": "hello"}], "sampling": {"max_tokens": 1}}).json()
    table = pa.table({"payload": [os.urandom(payload_bytes)]})  # incompressible: the file is about this big
    stored = rt.storage.write_table(f"jobs/{job['id']}/part-00000.parquet", table, {})
    shard_id = new_id("shard")
    with rt.sessions() as db, db.begin():
        ResultRepository(db).add_shard(Shard(id=shard_id, kind="job", job_id=job["id"], shard_index=0, path=stored.path,
                                          rows=stored.rows, bytes=stored.bytes, sha256=stored.sha256))
    with rt.storage.open(stored.path) as f:
        content = f.read()
    return IndexedShard(id=shard_id, url=f"/v1/shards/{shard_id}", path=stored.path, content=content, sha256=stored.sha256)
