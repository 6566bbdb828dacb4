"""OpenAI batch files on their own: an input file becomes one native job with each request's
file line kept, a bad line is reported by its 1-based line number, and rows render as the
output and error lines OpenAI writes (the end-to-end path: tests/integration/test_openai_batch.py)."""

from __future__ import annotations

import json

from service.openai_batch.input_file import ParsedInput, parse_input
from service.openai_batch.output_file import error_line, request_groups, success_line

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = {"teacher-a"}


def line(custom_id: str, url: str = CHAT, **body) -> str:
    body = {"model": "teacher-a", "messages": [{"role": "user", "content": custom_id}], "max_tokens": 8, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def file_of(*lines: str) -> bytes:
    return "\n".join(lines).encode()


def test_a_valid_file_is_one_job_with_the_file_lines_kept():
    parsed = parse_input(file_of(line("a", logprobs=True, top_logprobs=3), "", line("b", logprobs=True, top_logprobs=3)),
                         CHAT, MODELS)
    assert isinstance(parsed, ParsedInput)
    assert parsed.teacher == "teacher-a" and parsed.line_numbers == [1, 3] and parsed.logprobs
    first = parsed.job.requests[0]  # each line's own parameters, over the native defaults
    assert first.top_logprobs == 3 and first.sampling.max_tokens == 8
    assert parsed.job.top_logprobs == 3 and parsed.job.sampling.max_tokens == 8  # the first line's: the defaults
    assert [r.custom_id for r in parsed.job.requests] == ["a", "b"]
    assert parsed.job.requests[1].messages[0].content == "b"


def test_completion_prompts_as_text_or_token_ids():
    parsed = parse_input(file_of(line("t", COMPLETIONS, prompt="hello", messages=None),
                                 line("i", COMPLETIONS, prompt=[1, 2, 3], messages=None)), COMPLETIONS, MODELS)
    assert parsed.job.requests[0].prompt == "hello" and parsed.job.requests[1].prompt_token_ids == [1, 2, 3]
    assert not parsed.logprobs and parsed.job.top_logprobs == 0


def test_bad_lines_are_reported_by_line_number():
    errors = parse_input(file_of(line("a"), "{not json", line("a"), line("c", model="nope"),
                                 line("d", url=COMPLETIONS), json.dumps({"custom_id": "e", "method": "GET"})),
                         CHAT, MODELS)
    assert [(e.line, e.code) for e in errors] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "model_not_found"), (5, "mismatched_endpoint"),
        (6, "invalid_method")]
    assert errors[2].param == "body.model"


def test_an_empty_file_is_refused():
    assert [e.code for e in parse_input(b"\n\n", CHAT, MODELS)] == ["empty_file"]


def sample(index: int, sample_index: int = 0, **extra) -> dict:
    return {"custom_id": f"r{index}", "request_index": index, "sample_index": sample_index,
            "prompt_token_ids": [1, 2, 3], "completion_token_ids": [5, 6], "completion_text": "ab",
            "token_logprobs": [-0.5, -0.25], "top_token_ids": [[5, 7], [6, 8]],
            "top_logprobs": [[-0.5, -1.5], [-0.25, -2.0]], "finish_reason": "length", "error": None, **extra}


def decode(token_id: int) -> str:
    return {5: "a", 6: "b", 7: "x", 8: "y"}[token_id]


def test_rows_in_shard_order_are_grouped_per_request():
    groups = list(request_groups([sample(0), sample(1, 0), sample(1, 1)]))
    assert [(i, [s["sample_index"] for s in g]) for i, g in groups] == [(0, [0]), (1, [0, 1])]


def test_a_chat_success_line_carries_openai_logprobs_and_usage():
    out = json.loads(success_line([sample(0), sample(0, 1)], CHAT, "teacher-a", 1700000000, True, decode))
    body = out["response"]["body"]
    assert out["custom_id"] == "r0" and out["error"] is None and out["response"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["model"] == "teacher-a"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    first = body["choices"][0]["logprobs"]["content"][0]
    assert first == {"token": "a", "logprob": -0.5, "bytes": [97],
                     "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]},
                                      {"token": "x", "logprob": -1.5, "bytes": [120]}]}


def test_a_completion_success_line_has_offsets_from_the_completion_start():
    body = json.loads(success_line([sample(0)], COMPLETIONS, "teacher-a", 0, True, decode))["response"]["body"]
    logprobs = body["choices"][0]["logprobs"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "ab"
    assert logprobs["tokens"] == ["a", "b"] and logprobs["text_offset"] == [0, 1]
    assert logprobs["top_logprobs"] == [{"a": -0.5, "x": -1.5}, {"b": -0.25, "y": -2.0}]
    assert json.loads(success_line([sample(0)], COMPLETIONS, "m", 0, False, decode))[
        "response"]["body"]["choices"][0]["logprobs"] is None


def test_error_lines_say_why():
    assert json.loads(error_line("r1", "engine died"))["error"] == {"code": "request_failed", "message": "engine died"}
    assert json.loads(error_line("r1", "cancelled"))["error"]["code"] == "cancelled"
    expired = json.loads(error_line("r1", "whatever", expired=True))
    assert expired["error"]["code"] == "batch_expired" and expired["response"] is None
