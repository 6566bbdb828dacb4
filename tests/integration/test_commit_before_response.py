"""Every write commits before its response is sent: a commit that fails after the handler
returned must turn the answer into an error, never a 200 for something that was not stored."""

from __future__ import annotations

import io
import threading

import pytest
from sqlalchemy import orm

from tests.integration.test_pipeline_scripted import batch


@pytest.fixture
def failing_commit(monkeypatch):
    """Arm to make the next commit of a request's session fail (after the handler returned)."""
    armed = {"on": False, "skip": 0}
    original = orm.SessionTransaction.commit

    def commit(self, *args, **kwargs):
        if armed["on"] and self.parent is None and threading.current_thread().name != "finalizer":
            if armed["skip"]:
                armed["skip"] -= 1
                return original(self, *args, **kwargs)
            armed["on"] = False
            raise RuntimeError("injected commit failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(orm.SessionTransaction, "commit", commit)
    return armed


def jsonl_file(lines: int = 1) -> bytes:
    body = "".join('{"custom_id": "c%d", "method": "POST", "url": "/v1/completions", '
                   '"body": {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 2}}\n' % i
                   for i in range(lines))
    return body.encode()


def upload(api):
    return api.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(jsonl_file()))}, data={"purpose": "batch"})


def test_a_cancel_whose_commit_fails_is_not_answered_200(api, failing_commit):
    from fastapi.testclient import TestClient
    job = api.post("/v1/jobs", json=batch(2)).json()
    failing_commit["on"] = True
    client = TestClient(api.app, headers=dict(api.headers), raise_server_exceptions=False)
    answer = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 500
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] != "cancelled"


def test_a_file_upload_whose_commit_fails_is_not_answered_200(api, failing_commit):
    from fastapi.testclient import TestClient
    failing_commit["on"] = True
    client = TestClient(api.app, headers=dict(api.headers), raise_server_exceptions=False)
    assert upload(client).status_code == 500


def test_a_batch_create_whose_commit_fails_is_not_answered_200(api, failing_commit):
    from fastapi.testclient import TestClient
    file_id = upload(api).json()["id"]
    client = TestClient(api.app, headers=dict(api.headers), raise_server_exceptions=False)
    failing_commit["on"] = True  # the rate-limit spend shares the batch's transaction
    answer = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                              "completion_window": "24h"})
    assert answer.status_code == 500
    assert api.get("/v1/batches").json()["data"] == []


def test_an_upload_is_visible_to_the_next_request_at_once(api):
    file_id = upload(api).json()["id"]
    answer = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                           "completion_window": "24h"})
    assert answer.status_code == 200, answer.text
