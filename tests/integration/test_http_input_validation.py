"""Inputs that once answered 500 (found by fuzzing and probing the schema): each is now a 4xx
naming the field, and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

MAX_DEPTH = 32


def job(**change) -> dict:
    body = {"requests": [{"custom_id": "a", "prompt": "hi"}], "sampling": {"max_tokens": 1}}
    for key, value in change.items():
        where, _, name = key.partition("__")
        if where == "request":
            body["requests"][0][name] = value
        elif where == "sampling":
            body["sampling"][name] = value
        else:
            body[key] = value
    return body


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body, field",
    [
        (job(metadata={"a": "x\u0000y"}), "metadata"),  # Postgres JSONB refuses \u0000
        (job(metadata={"a\u0000": 1}), "metadata"),
        (job(metadata={"a": "\ud800"}), "metadata"),  # a lone surrogate cannot be encoded
        (job(metadata={"a": nested(MAX_DEPTH + 5)}), "metadata"),  # deeper than the serializers go
        (job(request__custom_id="a\u0000"), "requests[0].custom_id"),
        (job(request__custom_id="\udfff"), "requests[0].custom_id"),
        (job(request__prompt="\ud800"), "requests[0].prompt"),  # the tokenizer raised TypeError
        ({"requests": [{"messages": [{"role": "user", "content": "\udc00"}]}]}, "requests[0].messages[0].content"),
        ({"mode": "score", "requests": [{"prompt": "a", "response": "\ud800"}]}, "requests[0].response"),
        (job(sampling__stop=["a\u0000"]), "sampling.stop[0]"),
        (job(sampling__stop=["\ud800"]), "sampling.stop[0]"),
        (job(sampling__stop_token_ids=[-1]), "sampling.stop_token_ids[0]"),
        (job(sampling__stop_token_ids=[10**30]), "sampling.stop_token_ids[0]"),
        (job(sampling__top_k=10**30), "sampling.top_k"),
        ({"mode": "score", "requests": [{"messages": [{"role": "assistant", "content": "x"}]}]},
         "requests[0].messages"),  # no turn before the assistant's: the chat template raised
        (job(request__prompt=""), "requests[0].prompt"),
    ],
)
def test_bad_job_input_is_a_4xx_naming_the_field(api, body, field):
    response = api.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert api.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_metadata_are_refused(api, literal):
    body = '{"requests": [{"prompt": "hi"}], "metadata": {"a": %s}}' % literal  # json.loads reads these
    response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "metadata"


def test_a_body_too_deep_to_parse_is_a_400(api):
    response = api.post("/v1/jobs", content="[" * 100_000 + "]" * 100_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def upload(api, data: bytes, filename: str = "in.jsonl"):
    return api.post("/v1/files", files={"file": (filename, data)}, data={"purpose": "batch"})


def test_batch_metadata_with_nul_is_refused(api):
    file_id = upload(api, b"{}\n").json()["id"]
    response = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                             "metadata": {"a": "\u0000"}})
    assert response.status_code == 422 and response.json()["error"]["field"] == "metadata.a"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"custom_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),  # RecursionError
        (json.dumps({"custom_id": "a\u0000", "method": "POST", "url": "/v1/completions",
                     "body": {"model": "smollm2-135m-instruct", "prompt": "hi"}}).encode(), "NUL"),
    ],
)
def test_bad_batch_lines_fail_the_batch_not_the_server(api, line, message):
    file_id = upload(api, line + b"\n").json()["id"]
    batch = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"})
    assert batch.status_code == 200 and batch.json()["status"] == "failed"
    assert message in batch.json()["errors"]["data"][0]["message"]


@pytest.mark.parametrize("input_file_id", ["../../etc/passwd", "file-\u0000", "x" * 5000])
def test_a_malformed_input_file_id_is_refused_naming_it(api, input_file_id):
    response = api.post("/v1/batches", json={"input_file_id": input_file_id, "endpoint": "/v1/completions"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "input_file_id"


def test_only_batch_files_are_accepted(api):
    response = api.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "purpose"


def test_unknown_routes_and_methods_answer_in_the_error_shape(api):
    missing = api.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = api.delete("/v1/jobs")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"]  # Starlette names the methods of the first route on that path
