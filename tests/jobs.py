"""Helpers for tests that drive jobs through the API: wait for the end, read the shards."""

from __future__ import annotations

import io
import time

import pyarrow.parquet as pq

from service.states import JOB_FINISHED
from teachercache.shard_format import JOB_SCHEMA


def wait_for(api, job_id: str, timeout: float = 60) -> dict:
    """Poll until the job has ended and its shards are assembled."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in JOB_FINISHED and job["finished_at"]:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def download_rows(api, job: dict) -> list[dict]:
    """Every row of the job's shards, downloaded through the API, checked against the contract schema."""
    rows = []
    for shard in job["shards"]:
        response = api.get(shard["url"])
        assert response.status_code == 200
        table = pq.read_table(io.BytesIO(response.content))
        assert table.schema.remove_metadata().equals(JOB_SCHEMA)
        rows.extend(table.to_pylist())
    return rows


def create_api_key(rt, tenant: str) -> str:
    """A key for `tenant`, as `teachercache keys create --tenant` makes one."""
    from service.tenants.service import TenantService

    with rt.sessions() as db, db.begin():
        return TenantService(db).create_key(tenant, label="tests")[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
