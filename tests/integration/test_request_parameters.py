"""Per-request parameters on native jobs: `requests[i].sampling` and `requests[i].top_logprobs`
override the job's defaults, are validated per request, and are recorded per row."""

from __future__ import annotations

import json

import pytest

from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
DEFAULTS = {"max_tokens": 6, "seed": 1}


def job(requests: list[dict], **extra) -> dict:
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": DEFAULTS, "requests": requests, **extra}


MIXED = [
    {"custom_id": "default", "prompt_token_ids": [1, 2, 3]},
    {"custom_id": "short", "prompt_token_ids": [1, 2, 3], "sampling": {"max_tokens": 2, "seed": 9}},
    {"custom_id": "wide", "prompt_token_ids": [4, 5], "top_logprobs": 7},
    {"custom_id": "two", "prompt_token_ids": [4, 5], "sampling": {"n": 2}, "top_logprobs": 0},
]


def test_each_request_runs_with_its_own_parameters_as_if_alone(api, start_worker):
    mixed = api.post("/v1/jobs", json=job(MIXED)).json()
    alone = [api.post("/v1/jobs", json=job([{"prompt_token_ids": r["prompt_token_ids"]}],
                                           sampling={**DEFAULTS, **r.get("sampling", {})},
                                           top_logprobs=r.get("top_logprobs", 3), cache="bypass")).json()
             for r in MIXED]
    start_worker(ScriptedEngine())
    rows = download_rows(api, wait_for(api, mixed["id"]))
    assert [r["custom_id"] for r in rows] == ["default", "short", "wide", "two", "two"]
    for request, expected in zip(MIXED, alone):
        mine = [r for r in rows if r["custom_id"] == request["custom_id"]]
        theirs = download_rows(api, wait_for(api, expected["id"]))
        fields = ("completion_token_ids", "token_logprobs", "top_token_ids", "top_logprobs", "finish_reason")
        assert [{f: r[f] for f in fields} for r in mine] == [{f: r[f] for f in fields} for r in theirs]
    assert len(rows[1]["completion_token_ids"]) == 2 and len(rows[2]["top_token_ids"][0]) == 7
    assert rows[3]["top_token_ids"][0] == []


def test_rows_record_the_parameters_that_differ_from_the_job(api, start_worker):
    created = api.post("/v1/jobs", json=job(MIXED)).json()
    start_worker(ScriptedEngine())
    done = wait_for(api, created["id"])
    rows = download_rows(api, done)
    own = [json.loads(r["parameters"]) if r["parameters"] else None for r in rows]
    assert own == [None, {"sampling": {"max_tokens": 2, "seed": 9}}, {"top_logprobs": 7},
                   {"sampling": {"n": 2}, "top_logprobs": 0}, {"sampling": {"n": 2}, "top_logprobs": 0}]
    assert done["sampling"]["max_tokens"] == 6 and done["top_logprobs"] == 3  # the job keeps its defaults


@pytest.mark.parametrize("request_body, field", [
    ({"sampling": {"temperature": 11}}, "requests[1].sampling.temperature"),
    ({"sampling": {"max_tokens": 0}}, "requests[1].sampling.max_tokens"),
    ({"sampling": {"bogus": 1}}, "requests[1].sampling.bogus"),
    ({"sampling": {"stop": ["a\u0000"]}}, "requests[1].sampling.stop[0]"),
    ({"top_logprobs": -1}, "requests[1].top_logprobs"),
    ({"top_logprobs": 10**6}, "requests[1].top_logprobs"),
    ({"sampling": {"max_tokens": 10**5}}, "requests[1].sampling.max_tokens"),
])
def test_a_bad_parameter_of_one_request_is_named_and_nothing_is_written(api, request_body, field):
    before = api.get("/v1/jobs").json()["data"]
    body = job([{"prompt_token_ids": [1]}, {"prompt_token_ids": [2], **request_body}])
    response = api.post("/v1/jobs", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert field in error["message"] or error.get("field") == field, error
    assert api.get("/v1/jobs").json()["data"] == before
