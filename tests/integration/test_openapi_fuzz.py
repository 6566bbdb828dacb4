"""Fuzz every operation of the OpenAPI schema against the live app, in-process, on a real
Postgres: no input may cause a server error, and every answer must match the schema
(status code, content type, body).

Schemathesis generates valid and invalid requests from /openapi.json; no worker runs, so
submitted jobs simply stay queued. Bounded to a few dozen examples per operation and mode so
the whole module runs in about a minute on two cores.

Each operation runs as a subtest of one test, driven by Hypothesis directly: schemathesis's
pytest loader for fixture-built schemas (`schemathesis.pytest.from_fixture`) does not run
under pytest 9, and the schema needs the database fixtures to exist.
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.jobs import bearer
from tests.shards import add_job_shard

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# The suite runs a fixed (derandomized) set of examples; for a deeper, random search run e.g.
# TEACHERCACHE_FUZZ_EXAMPLES=1000 pytest tests/integration/test_openapi_fuzz.py
EXPLORE = os.environ.get("TEACHERCACHE_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(
    max_examples=int(EXPLORE or 40), deadline=None, derandomize=EXPLORE is None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.fixture
def auth_headers(api_key) -> dict[str, str]:
    """Headers every fuzzed request carries: tenant alpha's key (the `api` fixture's tenant)."""
    return bearer(api_key)


@pytest.fixture
def api_schema(rt):
    from service.http.app import create_app

    # Schemathesis runs the app's lifespan itself; the finalizer has nothing to do here.
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(rt, run_finalizer=False))


@pytest.fixture
def known_ids(api, rt, auth_headers) -> dict[str, str]:
    """Real rows for the id parameters, so the fuzzer also reaches past the 404 of an unknown id."""
    shard = add_job_shard(api, rt)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 1}}
    file_id = api.post("/v1/files", files={"file": ("in.jsonl", json.dumps(line).encode())}, data={"purpose": "batch"},
                       headers=auth_headers).json()["id"]
    batch = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"},
                     headers=auth_headers).json()
    return {"job_id": batch["metadata"]["teachercache_job_id"], "shard_id": shard.id, "file_id": file_id,
            "batch_id": batch["id"], "input_file_id": file_id}


def strategies(operation, known_ids: dict[str, str]) -> st.SearchStrategy:
    """Valid and invalid requests; and, where the operation takes ids, requests about real rows."""
    modes = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]
    names = [p.name for p in operation.path_parameters]
    if names and all(name in known_ids for name in names):
        real = {name: known_ids[name] for name in names}
        modes += [operation.as_strategy(generation_mode=mode, path_parameters=real) for mode in GenerationMode]
    modes.append(operation.as_strategy().map(lambda case: about_known_rows(case, known_ids)))
    return st.one_of(modes)


PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")


def about_known_rows(case, known_ids: dict[str, str]):
    """A valid body with its references pointed at real rows (the default teacher, a real file),
    and each job request given exactly one prompt, so the fuzzer's strings reach the database."""
    if isinstance(case.body, dict):
        case.body.pop("teacher", None)
        if "input_file_id" in case.body:
            case.body["input_file_id"] = known_ids["input_file_id"]
        for request in case.body.get("requests") or []:
            one_prompt(request, score=case.body.get("mode") == "score")
    return case


def one_prompt(request: dict, score: bool) -> None:
    given = [field for field in PROMPT_FIELDS if request.get(field) is not None] or ["prompt"]
    request.setdefault(given[0], "x")
    for field in PROMPT_FIELDS:
        if field != given[0]:
            request.pop(field, None)
    if not score:
        request.pop("response", None)
        request.pop("response_token_ids", None)


def fuzz(operation, known_ids: dict[str, str], headers: dict[str, str]) -> None:
    """Each answer is checked against the schema."""

    @FUZZ_SETTINGS
    @given(case=strategies(operation, known_ids))
    def call(case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    call()


def test_no_input_causes_a_server_error_or_breaks_the_schema(api_schema, known_ids, auth_headers, subtests):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz(operation, known_ids, auth_headers)
