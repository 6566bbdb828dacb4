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

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# The suite runs a fixed (derandomized) set of examples; for a deeper, random search run e.g.
# TEACHERCACHE_FUZZ_EXAMPLES=1000 pytest tests/test_openapi_fuzz.py
EXPLORE = os.environ.get("TEACHERCACHE_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(
    max_examples=int(EXPLORE or 40), deadline=None, derandomize=EXPLORE is None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.fixture
def auth_headers() -> dict[str, str]:
    """Headers every fuzzed request carries. With API keys this becomes
    `return {"Authorization": f"Bearer {api_key}"}` (taking the `api_key` fixture)."""
    return {}


@pytest.fixture
def api_schema(rt):
    from service.http.app import create_app

    # Schemathesis runs the app's lifespan itself; the finalizer has nothing to do here.
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(rt, run_finalizer=False))


def fuzz(operation, headers: dict[str, str]) -> None:
    """Valid and invalid requests for one operation; each answer is checked against the schema."""
    cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode])

    @FUZZ_SETTINGS
    @given(case=cases)
    def call(case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    call()


def test_no_input_causes_a_server_error_or_breaks_the_schema(api_schema, auth_headers, subtests):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz(operation, auth_headers)
