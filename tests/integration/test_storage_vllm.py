"""A real-engine job end to end on object storage: vLLM's CPU engine writes result shards to an S3
bucket (moto on loopback), the finalizer assembles the job shards there, and the client downloads
them through a presigned redirect and through the API's proxy, and streams them with ShardDataset."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import teachercache as tc
from tests.integration.test_client_live import serve_on_loopback

pytestmark = pytest.mark.engine
TEACHER = "smollm2-135m-instruct"


@pytest.mark.parametrize("storage_uri", ["s3"], indirect=True)
def test_a_real_engine_job_on_s3_is_downloaded_by_redirect_and_by_proxy_and_streamed(
        rt, api_key, start_worker, vllm_engine, s3_server, tmp_path, monkeypatch):
    from service.http.app import create_app

    monkeypatch.setenv("TEACHERCACHE_API_KEY", api_key)
    bucket = rt.settings.storage_uri.removeprefix("s3://").split("/")[0]
    start_worker(vllm_engine)
    requests = [{"custom_id": f"q{i}", "prompt": f"Name a colour. {i}"} for i in range(3)]
    with serve_on_loopback(create_app(rt)) as url, tc.Client(url) as client:
        job = client.wait(client.submit(requests, teacher=TEACHER, top_logprobs=5, sampling={"max_tokens": 8}),
                          poll_interval=0.2, timeout=300, raise_on_failure=True)
        manifest = client.shards(job)
        assert any(key.startswith("shards/jobs/") for key in s3_server.keys(bucket))
        assert not (rt.settings.state_dir / "shards").exists()  # nothing went to the local disk

        redirected = client.download(job, tmp_path / "redirect")
        rt.settings.storage_download = "proxy"  # read per request: the same job, through the API
        proxied = client.download(job, tmp_path / "proxy")
        for files in (redirected, proxied):
            assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == [s["sha256"] for s in manifest]
        rows = pa.concat_tables([pq.read_table(p) for p in redirected]).to_pylist()
        assert [r["custom_id"] for r in rows] == ["q0", "q1", "q2"]
        assert all(len(r["completion_token_ids"]) == len(r["top_token_ids"]) > 0 for r in rows)

        rt.settings.storage_download = "redirect"
        streamed = list(tc.ShardDataset(job=job["id"], client=client, shuffle=False))
        assert sorted(r["custom_id"] for r in streamed) == ["q0", "q1", "q2"]
