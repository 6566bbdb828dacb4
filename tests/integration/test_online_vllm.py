"""The synchronous endpoints against a real `vllm serve` of the default teacher, field by field:
every teacher-scoring form on-policy trainers send (echo with logprobs, prompt_logprobs with the
leading null, max_tokens 0 and 1, token-id and text prompts, batches), ordinary generation with
logprobs, chat; bad input refused with vLLM's status and error shape; a repeated score answered
from the cache.

`vllm serve` (bench/vllm_serve.py, the flags the local adapter uses) answers every case first and
is stopped before the local engine loads, so one vLLM engine runs at a time on a small machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.vllm_serve import SERVED_NAME, vllm_serve
from tests.integration.online_cases import OTHER, TEXT, bad_cases, ok_cases

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

TEACHER = "smollm2-135m-instruct"
ATOL = 1e-4  # nats: one model and engine build; the server batches and threads on its own
IGNORED = {"created", "model", "system_fingerprint"}  # the server's own: compared by type only
SERVER_START_S = 400


@pytest.fixture(scope="session")
def reference(teacher_model_dir: Path, tmp_path_factory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_model_dir)
    ids, other = tokenizer.encode(TEXT), tokenizer.encode(OTHER)
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    answers: dict[str, Any] = {}
    with vllm_serve(teacher_model_dir, log, SERVER_START_S) as base_url:
        for name, (path, body) in {**ok_cases(ids, other, SERVED_NAME), **bad_cases(ids, SERVED_NAME)}.items():
            response = httpx.post(base_url + path, json=body, timeout=300)
            answers[name] = (response.status_code, response.json())
        answers["models"] = (200, httpx.get(base_url + "/models").json())
    return {"ids": ids, "other": other, "answers": answers}


def assert_same(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal structure, keys, types and values; floats within ATOL; objects compared as mappings
    (JSON objects), the first key of each prompt_logprobs entry (the actual token) checked apart."""
    if isinstance(theirs, float) and isinstance(ours, float | int):
        assert abs(ours - theirs) <= ATOL, f"{where}: {ours} != {theirs}"
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours).__name__}, expected an object"
        assert set(ours) == set(theirs), f"{where}: keys {sorted(set(ours) ^ set(theirs))} differ"
        for key, value in theirs.items():
            if key in IGNORED:
                assert type(ours[key]) is type(value), f"{where}.{key}: type"
            elif key == "id":
                assert ours[key].split("-")[0] == value.split("-")[0], f"{where}.id: {ours[key]} vs {value}"
            else:
                assert_same(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{where}: length {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def first_keys(answer: dict) -> list[list[str | None]]:
    return [[None if p is None else next(iter(p)) for p in c.get("prompt_logprobs") or []] for c in answer["choices"]]


def test_every_form_matches_vllm_serve(reference, api, start_worker, vllm_engine):
    start_worker(vllm_engine)
    cases = ok_cases(reference["ids"], reference["other"], TEACHER)
    for name, (path, body) in cases.items():
        response = api.post(f"/v1{path}", json=body)
        status, theirs = reference["answers"][name]
        assert response.status_code == status == 200, (name, response.text)
        ours = response.json()
        assert_same(ours, theirs, name)
        assert first_keys(ours) == first_keys(theirs), name  # the actual token first, as vLLM orders it


def test_models_lists_the_teacher_as_vllm_lists_its_model(reference, api):
    _, theirs = reference["answers"]["models"]
    ours = api.get("/v1/models").json()
    entry = next(m for m in ours["data"] if m["id"] == TEACHER)
    assert set(ours) == set(theirs) and set(entry) == set(theirs["data"][0])
    assert entry["max_model_len"] == theirs["data"][0]["max_model_len"]


def test_bad_input_is_refused_as_vllm_serve_refuses_it(reference, api):
    for name, (path, body) in bad_cases(reference["ids"], TEACHER).items():
        status, theirs = reference["answers"][name]
        response = api.post(f"/v1{path}", json=body)
        assert response.status_code == status, (name, response.text, theirs)
        ours = response.json()
        assert set(ours) == set(theirs) == {"error"}, name
        assert {k: type(v) for k, v in ours["error"].items()} == {k: type(v) for k, v in theirs["error"].items()}, \
            (name, ours, theirs)
        assert ours["error"]["code"] == theirs["error"]["code"], name
        assert ours["error"]["param"] == theirs["error"]["param"] or name == "prompt_too_long", (name, ours, theirs)


def test_a_repeated_score_is_answered_from_the_cache(reference, api, start_worker, vllm_engine):
    start_worker(vllm_engine)
    body = {"model": TEACHER, "prompt": [reference["ids"], reference["other"]], "max_tokens": 0,
            "temperature": 0, "echo": True, "logprobs": 20}
    first = api.post("/v1/completions", json=body).json()
    computed = vllm_engine.stats()["requests"]
    again = api.post("/v1/completions", json=body).json()
    assert vllm_engine.stats()["requests"] == computed  # no new engine work
    assert [c["prompt_logprobs"] for c in again["choices"]] == [c["prompt_logprobs"] for c in first["choices"]]
