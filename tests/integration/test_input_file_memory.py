"""A job from a file of a few hundred thousand requests is accepted in bounded API memory.

The API runs as a child process (uvicorn, as in production; its finalizer off, so only the
submission runs there). Its resident set is read from /proc before the upload and at its peak
(VmHWM) after the job is created: the growth must stay far below what the job's requests take
held at once (a parsed and tokenized request of 64 token ids is about a kilobyte in Python).
"""

from __future__ import annotations

import pytest

from bench.bench_ingest import api_client, api_process, create_job, load_tokenizer, upload, write_file
from bench.common import rss_mb

REQUESTS = 250_000
BOUND_MB = 100  # a few batches of requests (5,000 each, read ahead by 2), the COPY buffers, the allocator's arenas


@pytest.mark.timeout(900)
def test_a_250k_request_file_is_accepted_with_bounded_api_memory(rt, api_key, tmp_path):
    path = tmp_path / "big.jsonl"
    size = write_file(path, REQUESTS, "token_ids", prompt_tokens=64)
    with api_process(rt) as (url, pid), api_client(url, api_key) as client:
        load_tokenizer(client)
        before = rss_mb(pid)
        file = upload(client, path)
        response = create_job(client, file["id"])
        growth = rss_mb(pid, "VmHWM") - before
    assert response.status_code == 201, response.text
    assert response.json()["counts"]["total"] == response.json()["counts"]["pending"] == REQUESTS
    assert growth < BOUND_MB, f"the API grew {growth:.0f} MB for a {size / 2**20:.0f} MiB file"
    print(f"the API grew {growth:.0f} MB for a {size / 2**20:.0f} MiB file")
    assert size > BOUND_MB * 2**20  # the file alone is over the bound (its requests parsed, several times)
