"""Tenants and API keys: every route but /healthz needs a key; one tenant never sees another's
jobs, shards, errors, files or batches (404, as if they did not exist); revoked keys stop at
once; keys are stored only as hashes and never logged; the embedded stack makes its own key."""

from __future__ import annotations

import json
import logging
import re
import stat
import time

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from typer.testing import CliRunner

from service.tenants.local_key import ensure_local_key
from service.tenants.models import ApiKey
from service.tenants.service import TenantService
from tests.jobs import bearer, create_api_key, download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
OPEN_PATHS = {"/healthz", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def job_body(prefix: str, n: int = 3, **extra) -> dict:
    requests = [{"custom_id": f"{prefix}-{i}", "prompt_token_ids": [5, 6, i]} for i in range(n)]
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": 4}, "requests": requests,
            "metadata": {"owner": prefix}, **extra}


def batch_file(prefix: str) -> bytes:
    line = {"custom_id": f"{prefix}-line", "method": "POST", "url": "/v1/completions",
            "body": {"model": TEACHER, "prompt": "Hello", "max_tokens": 3}}
    return (json.dumps(line) + "\n").encode()


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x_missing", path)


def protected_operations(app) -> list[tuple[str, str]]:
    """The API's operations (the status page's, which take the key as a cookie, apart)."""
    return sorted({(method, route.path) for route in app.routes if isinstance(route, APIRoute)
                   for method in route.methods if route.path not in OPEN_PATHS and not route.path.startswith("/ui")})


def status_pages(app) -> list[str]:
    return sorted({route.path for route in app.routes if isinstance(route, APIRoute)
                   and route.path.startswith("/ui") and "GET" in route.methods and route.path != "/ui/login"})


# -- keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nonsense", "Basic dXNlcjpwYXNz",
                                    "Bearer tck_0123456789abcdef_" + "A" * 43])
def test_every_route_but_health_refuses_a_missing_or_unknown_key(app, api, header):
    from fastapi.testclient import TestClient

    anonymous = TestClient(app)
    headers = {"Authorization": header} if header else {}
    operations = protected_operations(app)
    assert len(operations) >= 15  # jobs, shards, files, batches, teachers, cache, metrics
    for method, path in operations:
        response = anonymous.request(method, concrete(path), headers=headers)
        assert response.status_code == 401, (method, path, response.status_code)
        if method != "HEAD":
            assert response.json()["error"]["code"] == "unauthenticated"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.get("/healthz").status_code == 200


@pytest.mark.parametrize("cookie", [None, "", "nonsense", "tck_0123456789abcdef_" + "A" * 43])
def test_every_status_page_sends_a_browser_without_a_valid_key_to_the_login_form(app, cookie):
    from fastapi.testclient import TestClient

    anonymous = TestClient(app, follow_redirects=False)
    if cookie is not None:
        anonymous.cookies.set("teachercache_key", cookie)
    pages = status_pages(app)
    assert len(pages) >= 6  # jobs (twice), a job, its live part, workers, cache
    for path in pages:
        response = anonymous.get(concrete(path))
        assert response.status_code == 303 and response.headers["location"] == "/ui/login", (path, response.status_code)
    assert anonymous.get("/ui/login").status_code == 200


def test_a_revoked_key_stops_working_on_the_next_request(api, rt):
    key = create_api_key(rt, "alpha")
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200
    key_id = key.split("_")[1]
    with rt.sessions() as db, db.begin():
        TenantService(db).revoke(key_id)
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 401
    assert api.get("/v1/jobs").status_code == 200  # the tenant's other key still works


def test_keys_are_stored_only_as_a_hash(rt, api_key):
    secret = api_key.split("_", 2)[2]
    with rt.sessions() as db:
        rows = db.scalars(sa.select(ApiKey)).all()
        dump = str(db.execute(sa.text("SELECT * FROM api_keys")).all())
    assert len(rows) == 1 and secret not in dump and api_key not in dump
    assert len(rows[0].secret_sha256) == 64


def test_no_key_reaches_the_logs(api, api_key, rt, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = api_key[:-4] + "AAAA"
    api.get("/v1/jobs")
    api.get("/v1/jobs", headers=bearer(wrong))
    api.post("/v1/jobs", json=job_body("a"))
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert api_key not in text and wrong not in text
    assert api_key.split("_", 2)[2] not in text


def test_the_admin_cli_creates_lists_and_revokes_keys(api, settings, monkeypatch):
    import typer

    from service.cli import register

    cli_app = typer.Typer()
    register(cli_app)
    monkeypatch.setenv("TEACHERCACHE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TEACHERCACHE_STATE_DIR", str(settings.state_dir))
    runner = CliRunner()
    created = runner.invoke(cli_app, ["keys", "create", "--tenant", "gamma", "--label", "ci"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"tck_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", key)
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200

    listed = runner.invoke(cli_app, ["keys", "list", "--tenant", "gamma"])
    key_id = key.split("_")[1]
    assert key_id in listed.stdout and "active" in listed.stdout and key not in listed.stdout

    assert runner.invoke(cli_app, ["keys", "revoke", key_id]).exit_code == 0
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 401
    again = runner.invoke(cli_app, ["keys", "revoke", key_id])
    assert again.exit_code == 2 and "no active key" in again.stderr  # already revoked: says so
    bad = runner.invoke(cli_app, ["keys", "create", "--tenant", "Bad Name!"])
    assert bad.exit_code == 2 and "not a tenant name" in bad.stderr

    assert runner.invoke(cli_app, ["tenants", "set-limit", "gamma", "max_pending_requests_per_tenant", "2"]).exit_code == 0
    assert "max_pending_requests_per_tenant=2" in runner.invoke(cli_app, ["tenants", "list"]).stdout
    unknown = runner.invoke(cli_app, ["tenants", "set-limit", "gamma", "max_everything", "2"])
    assert unknown.exit_code == 2 and "not a per-tenant limit" in unknown.stderr
    assert runner.invoke(cli_app, ["tenants", "set-limit", "gamma", "submission_burst", "0.5"]).exit_code == 2
    assert runner.invoke(cli_app, ["tenants", "set-limit", "gamma", "max_pending_requests_per_tenant"]).exit_code == 0
    assert "gamma\t" in runner.invoke(cli_app, ["tenants", "list"]).stdout


def test_the_embedded_stack_makes_a_private_local_key_once(rt):
    path, created = ensure_local_key(rt)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    with rt.sessions() as db:
        assert TenantService(db).authenticate(key).tenant == "local"
    assert ensure_local_key(rt) == (path, False)
    with rt.sessions() as db, db.begin():  # revoked: the next start replaces it
        TenantService(db).revoke(key.split("_")[1])
    path, created = ensure_local_key(rt)
    assert created and path.read_text().strip() != key


# -- isolation -------------------------------------------------------------------------------

@pytest.fixture
def alpha_world(api, start_worker):
    """Tenant alpha's finished job (one request failed), an uploaded file and a batch."""
    body = job_body("alpha")
    body["requests"].append({"custom_id": "alpha-bad", "prompt_token_ids": [5, 4242]})
    job = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "shared-key"}).json()
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    job = wait_for(api, job["id"])
    assert job["status"] == "succeeded" and job["counts"]["failed"] == 1
    upload = api.post("/v1/files", files={"file": ("in.jsonl", batch_file("alpha"))}, data={"purpose": "batch"})
    batch = api.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/completions",
                                          "completion_window": "24h"}).json()
    return {"job": job, "file": upload.json(), "batch": batch}


def test_another_tenant_gets_404_for_everything_of_alpha(api, other_api, alpha_world):
    job, file, batch = alpha_world["job"], alpha_world["file"], alpha_world["batch"]
    shard_url = job["shards"][0]["url"]
    assert api.get(shard_url).status_code == 200
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/shards"), ("GET", f"/v1/jobs/{job['id']}/errors"),
        ("GET", shard_url), ("HEAD", shard_url),
        ("GET", f"/v1/files/{file['id']}"), ("GET", f"/v1/files/{file['id']}/content"),
        ("GET", f"/v1/batches/{batch['id']}"), ("POST", f"/v1/batches/{batch['id']}/cancel"),
        ("GET", f"/v1/jobs?after={job['id']}"), ("GET", f"/v1/batches?after={batch['id']}"),
        ("DELETE", f"/v1/files/{file['id']}"), ("GET", f"/v1/files?after={file['id']}"),
    ]:
        response = other_api.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code)
        assert "alpha" not in response.text
    assert other_api.get("/v1/jobs").json()["data"] == []
    assert other_api.get("/v1/batches").json()["data"] == []
    assert other_api.get("/v1/files").json()["data"] == []
    assert api.get(f"/v1/files/{file['id']}").status_code == 200  # not deleted by the other tenant
    assert other_api.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions",
                                               "completion_window": "24h"}).status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 200  # nothing of alpha's changed
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] != "cancelled"


def test_a_batch_s_output_file_is_its_tenant_s_alone(api, other_api, alpha_world):
    batch = alpha_world["batch"]
    deadline = time.monotonic() + 60
    while (batch := api.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    output = batch["output_file_id"]
    assert "alpha-line" in api.get(f"/v1/files/{output}/content").text
    assert other_api.get(f"/v1/files/{output}").status_code == 404
    assert other_api.get(f"/v1/files/{output}/content").status_code == 404


def test_the_cache_answers_beta_from_alpha_without_revealing_alpha(api, other_api, alpha_world):
    body = job_body("beta")  # the same prompts and parameters as alpha's first three
    body["metadata"] = {"owner": "beta"}
    job = other_api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "shared-key"}).json()
    assert job["id"] != alpha_world["job"]["id"]  # idempotency keys are per tenant
    assert job["counts"]["cached"] == 3
    job = wait_for(other_api, job["id"])
    rows = download_rows(other_api, job)
    assert [r["custom_id"] for r in rows] == ["beta-0", "beta-1", "beta-2"]
    assert job["metadata"] == {"owner": "beta"}
    assert other_api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"] == []
    stats = other_api.get("/v1/cache/stats").json()
    assert stats["hits"] == 3 and stats["misses"] == 0  # beta's own lookups only
    assert api.get("/v1/cache/stats").json()["hits"] == 0
    for shard in job["shards"]:  # alpha cannot read beta's shards either
        assert api.get(shard["url"]).status_code == 404


# -- limits ----------------------------------------------------------------------------------

@pytest.fixture
def limited(rt, api_key):
    """An app over the same database with the given limits, as tenant alpha."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.runtime import Runtime

    clients = []

    def make(key: str = api_key, **limits):
        runtime = Runtime(rt.settings.model_copy(update=limits), rt.database_url)
        client = TestClient(create_app(runtime, run_finalizer=False), headers=bearer(key))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def job_count(rt) -> int:
    with rt.sessions() as db:
        return db.scalar(sa.text("SELECT count(*) FROM jobs"))


def assert_limit(response, status: int, limit: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded" and error["limit"] == limit and limit in error["message"]
    return error


@pytest.mark.parametrize("limits, change, limit, field", [
    ({"max_requests_per_job": 2}, {}, "max_requests_per_job", "requests"),
    ({"max_tokens_per_job": 20}, {}, "max_tokens_per_job", "requests"),
    ({"max_top_logprobs": 2}, {"top_logprobs": 3}, "max_top_logprobs", "top_logprobs"),
    ({"max_completion_tokens": 3}, {"sampling": {"max_tokens": 4}}, "max_completion_tokens", "sampling.max_tokens"),
])
def test_each_job_limit_is_refused_with_422_naming_it(limited, rt, limits, change, limit, field):
    client = limited(**limits)
    error = assert_limit(client.post("/v1/jobs", json={**job_body("a"), **change}), 422, limit)
    assert error["field"] == field and error["max"] == limits[limit]
    assert job_count(rt) == 0
    relaxed = {name: value * 100 for name, value in limits.items()}
    assert limited(**relaxed).post("/v1/jobs", json={**job_body("a"), **change}).status_code == 201


def test_a_body_over_the_limit_is_refused_with_413(limited, rt):
    client = limited(max_body_bytes=2000)
    big = job_body("a", n=60)
    assert_limit(client.post("/v1/jobs", json=big), 413, "max_body_bytes")

    def chunks():  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for start in range(0, len(data), 500):
            yield data[start:start + 500]

    response = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert_limit(response, 413, "max_body_bytes")
    assert job_count(rt) == 0


def test_pending_requests_per_tenant_are_capped_with_429(limited, rt):
    client = limited(max_pending_requests_per_tenant=5)
    assert client.post("/v1/jobs", json=job_body("a", n=4)).status_code == 201
    response = client.post("/v1/jobs", json=job_body("b", n=2))
    error = assert_limit(response, 429, "max_pending_requests_per_tenant")
    assert error["pending"] == 4 and int(response.headers["retry-after"]) > 0
    assert job_count(rt) == 1
    beta = limited(key=create_api_key(rt, "beta"), max_pending_requests_per_tenant=5)
    assert beta.post("/v1/jobs", json=job_body("b", n=2)).status_code == 201  # another tenant's budget


def test_submissions_are_rate_limited_per_tenant_with_retry_after(limited, rt):
    client = limited(submissions_per_minute=6, submission_burst=2)
    assert [client.post("/v1/jobs", json=job_body(f"j{i}")).status_code for i in range(2)] == [201, 201]
    response = client.post("/v1/jobs", json=job_body("j2"))
    assert_limit(response, 429, "submissions_per_minute")
    assert 1 <= int(response.headers["retry-after"]) <= 10
    assert job_count(rt) == 2
    retried = client.post("/v1/jobs", json=job_body("j0"), headers={"Idempotency-Key": "k"})
    assert retried.status_code == 429  # a new submission, even with a key
    beta = limited(key=create_api_key(rt, "beta"), submissions_per_minute=6, submission_burst=2)
    assert beta.post("/v1/jobs", json=job_body("b")).status_code == 201


def set_tenant_limit(rt, tenant: str, name: str, value: float | None) -> None:
    with rt.sessions() as db, db.begin():
        TenantService(db).set_limit(tenant, name, value)


def test_a_tenant_s_own_limits_replace_the_service_s_at_its_next_request(api, other_api, rt):
    set_tenant_limit(rt, "alpha", "max_pending_requests_per_tenant", 3)
    set_tenant_limit(rt, "alpha", "max_requests_per_job", 10)
    assert_limit(api.post("/v1/jobs", json=job_body("a", n=11)), 422, "max_requests_per_job")
    assert api.post("/v1/jobs", json=job_body("a", n=3)).status_code == 201
    assert_limit(api.post("/v1/jobs", json=job_body("b", n=1)), 429, "max_pending_requests_per_tenant")
    assert other_api.post("/v1/jobs", json=job_body("b", n=11)).status_code == 201  # beta: the service's limits
    set_tenant_limit(rt, "alpha", "max_pending_requests_per_tenant", None)
    assert api.post("/v1/jobs", json=job_body("b", n=1)).status_code == 201


def test_a_tenant_s_own_rate_limit(api, other_api, rt):
    set_tenant_limit(rt, "beta", "submission_burst", 1)
    set_tenant_limit(rt, "beta", "submissions_per_minute", 1)
    assert other_api.post("/v1/jobs", json=job_body("b0")).status_code == 201
    response = other_api.post("/v1/jobs", json=job_body("b1"))
    assert_limit(response, 429, "submissions_per_minute")
    assert int(response.headers["retry-after"]) > 30  # one a minute
    assert [api.post("/v1/jobs", json=job_body(f"a{i}")).status_code for i in range(3)] == [201] * 3
