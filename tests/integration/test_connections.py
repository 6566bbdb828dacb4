"""One pooled connection per submission, and a pool that is exhausted answers 503, not 500."""

from __future__ import annotations

import concurrent.futures
import contextlib

import pytest
import sqlalchemy as sa

from service.models import Job
from tests.integration.test_pipeline_scripted import batch


@pytest.fixture
def settings(settings):
    # Room for 40 submissions in the rate limit; a pool wait well under the test's patience.
    return settings.model_copy(update={"submission_burst": 1000})


def test_forty_concurrent_submissions_with_distinct_keys_all_succeed(api, rt):
    """Each answer is the job or a 503 with Retry-After (never a 500, never a 30 s wait); a client
    retrying on 503 with its key gets every job, exactly once."""
    answers: list[int] = []

    def post(i):
        body = batch(2000 if i == 0 else 3)  # one large
        for _ in range(20):
            response = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"k-{i}"})
            answers.append(response.status_code)
            if response.status_code != 503:
                return response
            assert response.headers["Retry-After"]
        return response

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(post, range(40)))
    assert set(answers) <= {201, 503}, answers
    assert [r.status_code for r in responses] == [201] * 40
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Job)) == 40
    print(f"answers: {answers.count(201)} x 201, {answers.count(503)} x 503")


def test_an_exhausted_pool_answers_503_with_retry_after(api, rt):
    pool = rt.engine.pool
    with contextlib.ExitStack() as held:
        for _ in range(pool.size() + rt.engine.pool._max_overflow):
            held.enter_context(rt.engine.connect())
        from fastapi.testclient import TestClient
        client = TestClient(api.app, headers=dict(api.headers), raise_server_exceptions=False)
        answer = client.get("/v1/jobs")
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert answer.json()["error"]["code"] == "unavailable"
