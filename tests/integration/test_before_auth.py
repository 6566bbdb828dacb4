"""What an unauthenticated or oversized request can cost: nothing before its key is checked,
no event-loop time for a large body, and /healthz answers while the threadpool is busy."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from fastapi.testclient import TestClient

from service.settings import ServiceSettings
from tests.integration.test_pipeline_scripted import batch


class Exploding:
    """A body stream that fails the test if the server reads a byte of it."""

    read = False

    def __iter__(self):
        Exploding.read = True
        yield b"{}"


def test_a_body_without_a_valid_key_is_refused_401_before_it_is_read(app, api):
    anonymous = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer tc_nope_nope"}):
        Exploding.read = False
        answer = anonymous.post("/v1/jobs", content=Exploding(),
                                headers={**headers, "Content-Type": "application/json", "Content-Length": "300000000"})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthenticated"
        assert not Exploding.read
    Exploding.read = False
    upload = anonymous.post("/v1/files", content=Exploding(),
                            headers={"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "250000000"})
    assert upload.status_code == 401 and not Exploding.read


def test_each_route_has_its_own_body_limit(api):
    big = {"Content-Type": "application/json", "Content-Length": str(300 * 1024 * 1024)}
    answer = api.post("/v1/jobs", content=b"", headers=big)
    assert answer.status_code == 413 and answer.json()["error"]["limit"] == "max_body_bytes"
    huge = {"Content-Length": str(ServiceSettings().max_upload_bytes + 1), "Content-Type": "multipart/form-data; boundary=x"}
    upload = api.post("/v1/files", content=b"", headers=huge)
    assert upload.status_code == 413 and upload.json()["error"]["limit"] == "max_upload_bytes"
    other = api.post("/v1/completions", content=b"", headers={**big, "Content-Length": str(32 * 1024 * 1024)})
    assert other.status_code == 413 and other.json()["error"]["limit"] == "max_request_body_bytes"


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"max_text_chars": 1000})


def test_a_text_over_max_text_chars_is_refused_before_tokenizing(api, monkeypatch):
    from service.jobs import service as jobs_service

    def never(*_):
        raise AssertionError("tokenized")

    monkeypatch.setattr(jobs_service, "prepare_requests", never)
    body = batch(3)
    body["requests"][2] = {"custom_id": "huge", "messages": [{"role": "user", "content": "x" * 1001}]}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["limit"], error["field"], error["request_index"]) == ("max_text_chars", "requests[2].messages[0].content", 2)


def test_a_job_body_is_parsed_and_validated_off_the_event_loop(api, monkeypatch):
    import threading

    from service.jobs.schemas import JobCreate

    seen = {}
    original = JobCreate.model_validate.__func__

    def spy(cls, *args, **kwargs):
        seen["thread"] = threading.current_thread().name
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(JobCreate, "model_validate", classmethod(spy))
    loop_thread = api.portal.call(lambda: threading.current_thread().name)
    assert api.post("/v1/jobs", json=batch(2)).status_code == 201
    assert seen["thread"] != loop_thread
    invalid = api.post("/v1/jobs", json={**batch(2), "top_logprobs": -1})
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "top_logprobs"


def test_healthz_answers_while_the_threadpool_is_saturated(api, monkeypatch):
    from service.tenants.service import TenantService

    original = TenantService.authenticate

    def slow(self, token):
        time.sleep(3)
        return original(self, token)

    monkeypatch.setattr(TenantService, "authenticate", slow)
    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        busy = [pool.submit(api.get, "/v1/teachers") for _ in range(50)]
        time.sleep(0.5)
        started = time.monotonic()
        health = api.get("/healthz")
        took = time.monotonic() - started
        for future in busy:
            future.result()
    assert health.status_code == 200 and took < 1.5, took
