"""A sampled soft-label job end to end on the real teacher (vLLM CPU engine): API -> queue ->
worker -> result shards -> job shards, and the submission's validation."""

from __future__ import annotations

import io
import math

import pyarrow.parquet as pq
import pytest

from teachercache.soft_labels import decode_table
from tests.jobs import download_rows, wait_for

TEACHER = "smollm2-135m-instruct"
DRAWS = 40


def body(**soft_labels) -> dict:
    return {"teacher": TEACHER, "top_logprobs": 8, "sampling": {"max_tokens": 10, "n": 2, "seed": 3},
            "soft_labels": soft_labels,
            "requests": [{"custom_id": "a", "prompt": "The capital of France is"},
                         {"custom_id": "b", "messages": [{"role": "user", "content": "Name a fruit."}]}]}


@pytest.mark.parametrize("soft_labels, field", [
    ({"kind": "sampled", "draws": 0}, "soft_labels.draws"),
    ({"kind": "sampled", "draws": 256}, "soft_labels.draws"),
    ({"kind": "sampled", "temperature": 0.0}, "soft_labels.temperature"),
    ({"kind": "sampled", "temperature": 11}, "soft_labels.temperature"),
    ({"kind": "topk", "draws": 50}, "soft_labels"),
    ({"kind": "sample"}, "soft_labels.kind"),
])
def test_bad_soft_labels_are_a_422_naming_the_field(api, soft_labels, field):
    answer = api.post("/v1/jobs", json=body(**soft_labels))
    assert answer.status_code == 422, answer.text
    assert field in answer.text
    assert api.get("/v1/jobs").json()["data"] == []


@pytest.mark.engine
def test_a_sampled_job_records_draws_beside_the_same_completions(api, start_worker, vllm_engine):
    if not vllm_engine.can_draw:
        pytest.fail("the vLLM plugin teachercache_draws is not registered: reinstall the project (pip install -e .)")
    topk = api.post("/v1/jobs", json=body(kind="topk")).json()
    sampled = api.post("/v1/jobs", json=body(kind="sampled", draws=DRAWS, temperature=1.0)).json()
    assert sampled["soft_labels"]["kind"] == "sampled" and sampled["soft_labels"]["draws"] == DRAWS
    start_worker(vllm_engine)
    topk_rows = download_rows(api, wait_for(api, topk["id"], timeout=300))
    job = wait_for(api, sampled["id"], timeout=300)
    assert job["status"] == "succeeded" and job["counts"]["cached"] == 0  # its own cache key
    rows = download_rows(api, job)
    assert len(rows) == len(topk_rows) == 4
    for row, plain in zip(rows, topk_rows, strict=True):
        n = len(row["completion_token_ids"])
        assert row["completion_token_ids"] == plain["completion_token_ids"]
        assert row["top_token_ids"] == plain["top_token_ids"]
        assert plain["sample_token_ids"] is None and plain["sample_counts"] is None
        assert len(row["sample_token_ids"]) == len(row["sample_counts"]) == len(row["tail_logprob"]) == n
        for ids, counts in zip(row["sample_token_ids"], row["sample_counts"], strict=True):
            assert sum(counts) == DRAWS and len(ids) == len(set(ids)) == len(counts)
        for tail, top in zip(plain["tail_logprob"], plain["top_logprobs"], strict=True):
            assert tail == pytest.approx(math.log1p(-sum(math.exp(v) for v in top)), abs=1e-5)
    # The same sampled job again is answered from the cache, draws and all.
    again = wait_for(api, api.post("/v1/jobs", json=body(kind="sampled", draws=DRAWS)).json()["id"], timeout=120)
    assert again["counts"]["cached"] == 2
    assert [r["sample_counts"] for r in download_rows(api, again)] == [r["sample_counts"] for r in rows]
    # The compact encoding stores them as top-k-referenced codes and decodes them exactly.
    compact = wait_for(api, api.post("/v1/jobs", json=body(kind="sampled", draws=DRAWS, encoding="compact")).json()["id"],
                       timeout=120)
    decoded = [r for shard in compact["shards"]
               for r in decode_table(pq.read_table(io.BytesIO(api.get(shard["url"]).content))).to_pylist()]
    stored = pq.read_table(io.BytesIO(api.get(compact["shards"][0]["url"]).content)).column_names
    assert "sample_token_codes" in stored and "sample_token_ids" not in stored
    for name in ("sample_token_ids", "sample_counts", "top_token_ids"):
        assert [r[name] for r in decoded] == [r[name] for r in rows], name
