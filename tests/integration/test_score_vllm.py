"""Score mode with the real teacher: teacher-forced logprobs on given responses, through the
service, checked against generation, against transformers, and for alignment."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import download_rows, wait_for
from tests.oracle import assert_row_matches, forward_logprobs

pytestmark = pytest.mark.engine
TEACHER = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name two primary colors."]


@pytest.fixture(scope="module")
def hf_model(teacher_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_model_dir, dtype=torch.float32).eval()


def run(api, body: dict) -> list[dict]:
    job = api.post("/v1/jobs", json={"teacher": TEACHER, "top_logprobs": 20, **body}).json()
    return download_rows(api, wait_for(api, job["id"], timeout=300))


def generated(api) -> list[dict]:
    requests = [{"custom_id": q, "messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    return run(api, {"sampling": {"max_tokens": 16, "seed": 3}, "requests": requests})


def test_scoring_the_teachers_own_output_reproduces_its_logprobs(api, start_worker, vllm_engine, hf_model):
    start_worker(vllm_engine)
    samples = generated(api)
    requests = [{"custom_id": r["custom_id"], "prompt_token_ids": r["prompt_token_ids"],
                 "response_token_ids": r["completion_token_ids"]} for r in samples]
    scored = run(api, {"mode": "score", "requests": requests})
    for gen, score in zip(samples, scored):
        assert score["finish_reason"] == "scored" and score["completion_token_ids"] == gen["completion_token_ids"]
        for t in range(len(gen["completion_token_ids"])):
            assert abs(score["token_logprobs"][t] - gen["token_logprobs"][t]) <= 1e-3
            assert max(abs(a - b) for a, b in zip(score["top_logprobs"][t], gen["top_logprobs"][t])) <= 1e-3
            same = [a == b for a, b in zip(score["top_token_ids"][t], gen["top_token_ids"][t])]
            assert all(same) or _ties_only(score, gen, t)
        assert_row_matches(hf_model, score)  # and both agree with transformers


def _ties_only(a: dict, b: dict, t: int) -> bool:
    return all(x == y or abs(lx - ly) <= 1e-5 for x, y, lx, ly in
               zip(a["top_token_ids"][t], b["top_token_ids"][t], a["top_logprobs"][t], b["top_logprobs"][t]))


def test_transcript_and_explicit_forms_give_the_same_numbers(api, start_worker, vllm_engine, rt):
    start_worker(vllm_engine)
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "Paris."}]
    teacher = rt.teachers.get(TEACHER)
    prompt = teacher.encode_chat(messages[:1])
    full = teacher.encode_chat(messages, add_generation_prompt=False)
    rows = run(api, {"mode": "score", "cache": "bypass", "requests": [
        {"custom_id": "transcript", "messages": messages},
        {"custom_id": "explicit", "prompt_token_ids": prompt, "response_token_ids": full[len(prompt):]},
    ]})
    transcript, explicit = rows
    assert transcript["completion_token_ids"] == explicit["completion_token_ids"] == full[len(prompt):]
    assert transcript["token_logprobs"] == pytest.approx(explicit["token_logprobs"], abs=1e-5)
    assert transcript["top_token_ids"] == explicit["top_token_ids"]


def test_the_first_response_token_is_conditioned_on_the_whole_prompt(api, start_worker, vllm_engine, hf_model):
    start_worker(vllm_engine)
    prompt, response = [1, 4093, 198, 1780, 314, 260], [3575, 282, 4649]
    [row] = run(api, {"mode": "score", "requests": [{"prompt_token_ids": prompt, "response_token_ids": response}]})
    whole = forward_logprobs(hf_model, prompt, response)[0]  # the distribution after the last prompt token
    shorter = forward_logprobs(hf_model, prompt[:-1], [prompt[-1]])[0]  # one position too early
    assert abs(row["token_logprobs"][0] - whole[response[0]].item()) <= 1e-3
    assert abs(row["token_logprobs"][0] - shorter[response[0]].item()) > 1e-2
    assert row["top_token_ids"][0] == torch.topk(whole, 20).indices.tolist()
