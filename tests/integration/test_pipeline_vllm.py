"""The main job end to end with the real teacher on vLLM's CPU engine, checked against
transformers: API -> Postgres queue -> worker loop -> result shards -> job shards -> download."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import download_rows, wait_for
from tests.oracle import assert_row_matches

pytestmark = pytest.mark.engine
TEACHER = "smollm2-135m-instruct"
CONTRACT_COLUMNS = ["custom_id", "request_index", "sample_index", "prompt_token_ids", "completion_token_ids",
                    "completion_text", "token_logprobs", "top_token_ids", "top_logprobs", "sample_token_ids",
                    "sample_counts", "finish_reason", "error", "tail_logprob", "cached"]


@pytest.fixture(scope="module")
def hf_model(teacher_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_model_dir, dtype=torch.float32).eval()


def mixed_batch(**sampling) -> dict:
    return {
        "teacher": TEACHER, "top_logprobs": 20, "sampling": {"max_tokens": 12, "n": 2, "seed": 7, **sampling},
        "requests": [
            {"custom_id": "text", "prompt": "The capital of France is"},
            {"custom_id": "chat", "messages": [{"role": "user", "content": "Name a color."}]},
            {"custom_id": "ids", "prompt_token_ids": [1, 4093, 198, 1780, 314, 216, 33, 29, 33, 47, 2, 198, 1, 520, 9531, 198]},
        ],
    }


def test_generate_job_matches_transformers(api, start_worker, vllm_engine, hf_model):
    job = api.post("/v1/jobs", json=mixed_batch()).json()
    start_worker(vllm_engine)
    job = wait_for(api, job["id"], timeout=300)
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 3
    rows = download_rows(api, job)
    assert list(rows[0]) == [*CONTRACT_COLUMNS, "parameters"]  # the contract's, then each request's own parameters
    assert [(r["custom_id"], r["sample_index"]) for r in rows] == [(c, s) for c in ("text", "chat", "ids") for s in (0, 1)]
    for row in rows:
        n = len(row["completion_token_ids"])
        assert 0 < n <= 12 and row["finish_reason"] in ("stop", "length") and row["error"] is None
        assert len(row["token_logprobs"]) == len(row["top_token_ids"]) == len(row["top_logprobs"]) == n
        assert all(len(top) == 20 for top in row["top_token_ids"])
        assert_row_matches(hf_model, row)
    assert rows[0]["completion_token_ids"] != rows[1]["completion_token_ids"]  # two samples, not one twice


def test_greedy_output_equals_transformers_greedy_decode(api, start_worker, vllm_engine, hf_model):
    body = mixed_batch(temperature=0.0, n=1)
    job = api.post("/v1/jobs", json=body).json()
    start_worker(vllm_engine)
    rows = download_rows(api, wait_for(api, job["id"], timeout=300))
    for row in rows:
        prompt = torch.tensor([row["prompt_token_ids"]])
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                     do_sample=False)[0, prompt.shape[1]:].tolist()
        assert row["completion_token_ids"] == expected[: len(row["completion_token_ids"])]
        assert len(row["completion_token_ids"]) == len(expected)
