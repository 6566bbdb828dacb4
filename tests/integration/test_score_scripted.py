"""Score mode through the service (scripted engine): tokenization of the three request forms,
validation, and rows that carry exactly the response tokens. Numbers are checked against the
real teacher in test_score_vllm.py."""

from __future__ import annotations

import pytest

from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


def score_job(requests: list[dict], **extra) -> dict:
    return {"teacher": TEACHER, "mode": "score", "top_logprobs": 5, "requests": requests, **extra}


def test_transcript_and_explicit_forms_give_the_same_tokens(api, start_worker, rt):
    teacher = rt.teachers.get(TEACHER)
    transcript = {"custom_id": "transcript", "messages": QUESTION + [{"role": "assistant", "content": ANSWER}]}
    full = teacher.encode_chat(transcript["messages"], add_generation_prompt=False)
    prompt = teacher.encode_chat(QUESTION)
    explicit_ids = {"custom_id": "ids", "prompt_token_ids": prompt, "response_token_ids": full[len(prompt):]}
    job = api.post("/v1/jobs", json=score_job([transcript, explicit_ids])).json()
    assert job["counts"]["total"] == 2
    engine = ScriptedEngine()
    start_worker(engine)
    rows = download_rows(api, wait_for(api, job["id"]))
    assert engine.stats()["requests"] == 1  # one cache key: computed once for both forms
    assert rows[0]["prompt_token_ids"] == rows[1]["prompt_token_ids"] == prompt
    assert rows[0]["completion_token_ids"] == rows[1]["completion_token_ids"] == full[len(prompt):]
    assert teacher.decode(rows[0]["completion_token_ids"]).startswith(ANSWER)
    assert rows[0]["completion_token_ids"][-2] == teacher._tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(r["finish_reason"] == "scored" for r in rows)


def test_text_response_is_tokenized_without_special_tokens(api, start_worker, rt):
    teacher = rt.teachers.get(TEACHER)
    job = api.post("/v1/jobs", json=score_job([{"prompt": "Q: 2+2? A:", "response": " 4"}])).json()
    start_worker(ScriptedEngine())
    [row] = download_rows(api, wait_for(api, job["id"]))
    assert row["completion_token_ids"] == teacher.encode_continuation(" 4")
    assert row["prompt_token_ids"] == teacher.encode_text("Q: 2+2? A:")
    assert len(row["token_logprobs"]) == len(row["top_token_ids"]) == len(row["completion_token_ids"])


@pytest.mark.parametrize(
    "request_, field",
    [
        ({"prompt": "no response"}, "requests[0].response"),
        ({"prompt": "x", "response": "a", "response_token_ids": [5]}, "requests[0].response"),
        ({"messages": QUESTION}, "requests[0].response"),
        ({"prompt": "x", "response_token_ids": [1, 49152]}, "requests[0].response_token_ids"),
        ({"prompt": "x", "response": "word " * 2100}, "requests[0].response"),
    ],
)
def test_bad_score_requests_are_rejected_with_their_index(api, request_, field):
    response = api.post("/v1/jobs", json=score_job([request_]))
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_generate_jobs_refuse_a_response(api):
    response = api.post("/v1/jobs", json={"teacher": TEACHER, "requests": [{"prompt": "x", "response": "y"}]})
    assert response.status_code == 422 and response.json()["error"]["field"] == "requests[0].response"
