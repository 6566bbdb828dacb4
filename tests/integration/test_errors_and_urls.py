"""/v1/jobs/{id}/errors pages; shard URLs never come from an untrusted Host in production."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.models import Job
from tests.integration.test_pipeline_scripted import batch
from tests.jobs import bearer, wait_for
from workers.scripted_engine import ScriptedEngine


def test_errors_page_by_request_index(api, start_worker):
    body = batch(7)
    for i in (1, 3, 4, 6):
        body["requests"][i] = {"custom_id": f"bad{i}", "prompt_token_ids": [1, 4242]}
    job = api.post("/v1/jobs", json=body).json()
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    wait_for(api, job["id"])
    first = api.get(f"/v1/jobs/{job['id']}/errors", params={"limit": 3}).json()
    assert [e["request_index"] for e in first["errors"]] == [1, 3, 4] and first["has_more"] and first["next"] == 4
    rest = api.get(f"/v1/jobs/{job['id']}/errors", params={"limit": 3, "after": first["next"]}).json()
    assert [e["request_index"] for e in rest["errors"]] == [6] and not rest["has_more"] and rest["next"] is None
    assert api.get(f"/v1/jobs/{job['id']}/errors", params={"limit": 0}).status_code == 422


@pytest.fixture
def production(rt):
    def make(**settings):
        from service.http.app import create_app

        rt.settings = rt.settings.model_copy(update={"production": True, **settings})
        return create_app(rt, run_finalizer=False)
    return make


def test_in_production_no_url_is_built_from_an_untrusted_host(production, api_key, rt):
    client = TestClient(production(), headers=bearer(api_key), base_url="http://evil.example")
    job = client.post("/v1/jobs", json=batch(1))
    assert job.status_code == 421 and job.json()["error"]["field"] == "Host"
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Job)) == 0  # the refused submission left nothing


def test_in_production_public_url_or_an_allowed_host_builds_urls(production, api_key):
    trusted = TestClient(production(allowed_hosts=["api.internal"]), headers=bearer(api_key),
                         base_url="http://api.internal")
    assert trusted.post("/v1/jobs", json=batch(1)).status_code == 201
    public = TestClient(production(public_url="https://tc.example.com"), headers=bearer(api_key),
                        base_url="http://evil.example")
    assert public.get("/v1/jobs").status_code == 200
