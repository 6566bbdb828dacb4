"""Assembly's memory is bounded by its window (`assembly_batch_rows`), not by the job's size.

A 200,000-request job (scripted rows: 64 tokens, top-20: about 2 GB of rows in Arrow, 1.5 GB of
zstd Parquet) is seeded without an engine and assembled in a child process, which reports its
own RSS before and its peak after (VmHWM: getrusage's peak would include pytest's own RSS, which
Linux carries across exec, and did fail this test in some orders of test files); the growth must
stay under a bound far below the job's size.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from bench.bench_assembly import assemble_in_child, seed_job
from service.models import Job, Shard

REQUESTS = 200_000
BOUND_MB = 640  # the window's rows a few times over (read, taken, cast, compressed), plus Arrow's pool: ~390 measured


@pytest.mark.timeout(900)
def test_assembling_a_200k_request_job_keeps_rss_growth_bounded(rt):
    job_id = seed_job(rt, REQUESTS)
    measured = assemble_in_child(rt, batch_rows=2048)
    assert measured["finalized"] == 1
    with rt.sessions() as db:
        assert db.get(Job, job_id).status == "succeeded"
        shards = list(db.scalars(sa.select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)))
    assert sum(s.rows for s in shards) == REQUESTS
    job_bytes = sum(s.bytes for s in shards)
    assert job_bytes > 2 * BOUND_MB * 2**20  # the job really is far bigger than the bound
    assert measured["rss_growth_mb"] < BOUND_MB, measured
    last = pq.ParquetFile(rt.storage.local_path(shards[-1].path))
    assert last.read(columns=["request_index"]).column(0).to_pylist()[-1] == REQUESTS - 1
