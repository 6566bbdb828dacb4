"""Mixed OpenAI batch files, as they are in the wild: each line its own parameters (with and
without logprobs, its own k, max_tokens, seed and n), on both endpoints, driven through the
official `openai` client. Each output line must equal the same request run alone as a native job."""

from __future__ import annotations

import pytest

from tests.integration.test_openai_batch import CHAT, COMPLETIONS, TEACHER, oai, read_jsonl, upload, wait_for_batch  # noqa: F401
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

FLOOR = -9999.0  # what OpenAI writes for a logprob of -inf

CHAT_LINES = [
    {"max_tokens": 4, "logprobs": True, "top_logprobs": 3},
    {"max_tokens": 6},  # no logprobs next to lines with them
    {"max_completion_tokens": 3, "seed": 7, "logprobs": True, "top_logprobs": 1},
    {"max_tokens": 5, "seed": 2, "temperature": 0.8, "n": 2, "logprobs": True, "top_logprobs": 0},
    {"max_tokens": 2, "temperature": 0.0, "stop": ["\n"], "response_format": {"type": "text"}},
]
COMPLETION_LINES = [
    {"max_tokens": 4, "logprobs": 2},
    {"max_tokens": 3},
    {"max_tokens": 5, "seed": 11, "logprobs": 0},
    {"max_tokens": 2, "seed": 3, "logprobs": 4, "n": 2},
]

# The same request run in another batch: the same tokens, but vLLM's CPU kernels sum in another
# order, so a logprob may differ by a few 1e-6 (measured 5.0e-6); the scripted engine is exact.
LOGPROB_ABS = 1e-4

def line(endpoint: str, i: int, params: dict) -> dict:
    prompt = ({"messages": [{"role": "user", "content": f"Count to {i}."}]} if endpoint == CHAT
              else {"prompt": f"Say {i}."})
    return {"custom_id": f"x{i}", "method": "POST", "url": endpoint, "body": {"model": TEACHER, **prompt, **params}}


def native_alone(api, endpoint: str, i: int, params: dict) -> dict:
    """The same request as a native job of its own (computed apart: the cache bypassed)."""
    request = ({"messages": [{"role": "user", "content": f"Count to {i}."}]} if endpoint == CHAT
               else {"prompt": f"Say {i}."})
    sampling = {k: v for k, v in params.items() if k in ("temperature", "seed", "n", "stop", "max_tokens")}
    if "max_completion_tokens" in params:
        sampling["max_tokens"] = params["max_completion_tokens"]
    k = params.get("top_logprobs", 0) if endpoint == CHAT else params.get("logprobs") or 0
    body = {"teacher": TEACHER, "top_logprobs": k, "sampling": sampling, "cache": "bypass", "requests": [request]}
    created = api.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    return created.json()


def check_chat_choice(choice: dict, row: dict, params: dict) -> None:
    assert choice["message"]["content"] == row["completion_text"]
    assert choice["finish_reason"] == row["finish_reason"]
    if not params.get("logprobs"):
        assert choice["logprobs"] is None
        return
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([max(lp, FLOOR) for lp in row["token_logprobs"]], abs=LOGPROB_ABS)
    assert [len(c["top_logprobs"]) for c in content] == [params["top_logprobs"]] * len(content)
    for entry, top in zip(content, row["top_logprobs"]):
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([max(lp, FLOOR) for lp in top], abs=LOGPROB_ABS)


def check_text_choice(choice: dict, row: dict, params: dict) -> None:
    assert choice["text"] == row["completion_text"] and choice["finish_reason"] == row["finish_reason"]
    if params.get("logprobs") is None:
        assert choice["logprobs"] is None
        return
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"] == pytest.approx([max(lp, FLOOR) for lp in row["token_logprobs"]], abs=LOGPROB_ABS)
    # Alternatives that decode to one text collapse into one key, as in OpenAI's format.
    assert all(len(top) <= params["logprobs"] for top in logprobs["top_logprobs"])
    assert [len(ids) for ids in row["top_token_ids"]] == [params["logprobs"]] * len(row["top_token_ids"])


def run_mixed(oai, api, start_worker, engine, endpoint: str, lines: list[dict]) -> None:
    batch = oai.batches.create(input_file_id=upload(oai, [line(endpoint, i, p) for i, p in enumerate(lines)]),
                               endpoint=endpoint, completion_window="24h")
    assert batch.status == "in_progress", batch.errors
    alone = [native_alone(api, endpoint, i, p) for i, p in enumerate(lines)]
    start_worker(engine)
    batch = wait_for_batch(oai, batch.id, timeout=600)
    assert batch.status == "completed" and batch.request_counts.failed == 0 and batch.error_file_id is None
    output = read_jsonl(oai, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"x{i}" for i in range(len(lines))]
    for out, params, job in zip(output, lines, alone):
        rows = download_rows(api, wait_for(api, job["id"], timeout=600))
        choices = out["response"]["body"]["choices"]
        assert len(choices) == len(rows) == params.get("n", 1)
        for choice, row in zip(choices, rows):
            (check_chat_choice if endpoint == CHAT else check_text_choice)(choice, row, params)
        usage = out["response"]["body"]["usage"]
        assert usage["completion_tokens"] == sum(len(r["completion_token_ids"]) for r in rows)


@pytest.mark.parametrize("endpoint, lines", [(CHAT, CHAT_LINES), (COMPLETIONS, COMPLETION_LINES)])
def test_each_line_of_a_mixed_file_equals_its_request_run_alone(oai, api, start_worker, endpoint, lines):
    run_mixed(oai, api, start_worker, ScriptedEngine(), endpoint, lines)


@pytest.mark.engine
@pytest.mark.parametrize("endpoint, lines", [(CHAT, CHAT_LINES), (COMPLETIONS, COMPLETION_LINES)])
def test_each_line_of_a_mixed_file_equals_its_request_run_alone_on_the_real_engine(oai, api, start_worker,
                                                                                     vllm_engine, endpoint, lines):
    run_mixed(oai, api, start_worker, vllm_engine, endpoint, lines)
