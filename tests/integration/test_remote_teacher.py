"""A remote teacher end to end against a stub OpenAI-compatible server on loopback: the API,
the queue, a worker whose engine is an HTTP client, the shards, the spend. The real-vLLM
comparison is in tests/integration/test_remote_vllm.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
import yaml

from service.settings import PROJECT_ROOT, ServiceSettings
from tests.jobs import download_rows, wait_for
from tests.remote_stub import CHAT_ANSWER, StubTeacher
from workers.main import build_remote_engine

TEACHER = "stub-teacher"
CHAT_TEACHER = "stub-chat"  # a hosted chat API: messages in, token strings and bytes out
KEY_ENV = "STUB_TEACHER_KEY"
SECRET = "sk-stub-0123456789abcdef"
RPM = 120  # 2 requests/s, bucket of 2
PRICES = {"price_per_million_prompt_tokens": 2.0, "price_per_million_completion_tokens": 10.0}


@pytest.fixture
def stub():
    server = StubTeacher()
    yield server
    server.close()


@pytest.fixture
def teachers_file(tmp_path, stub):
    path = tmp_path / "teachers.yaml"
    entry = {"name": TEACHER, "revision": "stub-1", "tokenizer": "smollm2-135m-instruct", "max_model_len": 2048,
             "source": {"kind": "remote", "base_url": stub.base_url, "model": "stub", "api_key_env": KEY_ENV,
                        "max_concurrency": 4, "requests_per_minute": RPM, "max_retries": 2,
                        "backoff_initial_s": 0.2, "backoff_max_s": 0.5, **PRICES}}
    chat = {"name": CHAT_TEACHER, "revision": "stub-chat-1", "tokenizer": "smollm2-135m-instruct",
            "source": {"kind": "remote", "api": "chat", "vllm_extensions": False, "base_url": stub.base_url,
                       "model": "stub-chat"}}
    path.write_text(yaml.safe_dump({"teachers": [entry, chat]}))
    return path


@pytest.fixture
def settings(tmp_path, database_url, teachers_file) -> ServiceSettings:
    """The suite's settings plus the operator's file that registers the stub as a teacher."""
    return ServiceSettings(database_url=database_url, state_dir=tmp_path / "state", models_dir=PROJECT_ROOT / "models",
                           finalizer_poll_s=0.1, teachers_file=teachers_file)


@pytest.fixture
def remote_worker(rt, start_worker, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    engines = []

    def start(**overrides):
        engine = build_remote_engine(rt.teachers.get(TEACHER))
        engines.append(engine)
        return start_worker(engine, teacher=TEACHER, **overrides), engine

    yield start
    for engine in engines:
        engine.close()


def batch(n: int, max_tokens: int = 5) -> dict:
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": max_tokens, "n": 2},
            "requests": [{"custom_id": f"q{i}", "prompt": f"Question number {i}?"} for i in range(n)]}


def test_429_then_500s_back_off_within_budget_and_the_failure_is_recorded(api, rt, stub, remote_worker, caplog):
    stub.echo_authorization = True  # its error bodies carry the key: it must not reach our records
    stub.script = [(429, {"Retry-After": "1"}, "slow down")] + [(500, {}, "upstream exploded")] * 8
    job = api.post("/v1/jobs", json=batch(1)).json()
    with caplog.at_level(logging.INFO):
        worker, engine = remote_worker()
        job = wait_for(api, job["id"], timeout=60)
        worker.stop()
    assert job["counts"]["failed"] == 1
    # 3 task attempts (the queue's), each 1 + max_retries HTTP requests (the adapter's).
    assert len(stub.seen) == 9 and not stub.script
    with rt.engine.connect() as db:
        attempts, errors = db.execute(sa.text("SELECT attempts, errors FROM tasks")).one()
    assert attempts == 3 and [e["attempt"] for e in errors] == [1, 2, 3]
    assert all(e["error"].startswith("remote teacher HTTP 500: upstream exploded") for e in errors)
    [failure] = api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"]
    assert "remote teacher HTTP 500: upstream exploded (you sent Bearer ***)" in failure["error"]

    at = [seen.at for seen in stub.seen]
    gap = [b - a for a, b in zip(at, at[1:])]
    assert gap[0] >= 1.0, "Retry-After: 1 was not honoured"
    # Exponential backoff within each task attempt: 0.2 s then 0.4 s (each plus jitter, at most 0.5 s).
    assert gap[1] >= 0.4 and gap[3] >= 0.2 and gap[4] >= 0.4 and gap[6] >= 0.2 and gap[7] >= 0.4, gap
    for i in range(len(at)):  # never more than the bucket plus the rate: 2 + 2 t requests in t seconds
        for j in range(i + 1, len(at)):
            assert j - i + 1 <= 2 + RPM / 60 * (at[j] - at[i]) + 0.05
    assert all(s.headers["authorization"] == f"Bearer {SECRET}" for s in stub.seen)
    stats = engine.stats()
    assert stats["http_requests"] == 9 and stats["http_rate_limited"] == 1 and stats["http_retries"] == 6
    everything = caplog.text + str(api.get(f"/v1/jobs/{job['id']}").json()) + str(failure) + str(errors)
    assert SECRET not in everything


def test_a_resubmitted_job_sends_nothing_to_the_teacher_and_its_spend_is_all_cached(api, stub, remote_worker):
    body = batch(3)
    first = api.post("/v1/jobs", json=body).json()
    worker, engine = remote_worker()
    first = wait_for(api, first["id"], timeout=60)
    assert first["status"] == "succeeded" and first["counts"]["completed"] == 3
    assert len(stub.seen) == 3
    rows = download_rows(api, first)
    assert [len(r["completion_token_ids"]) for r in rows] == [5] * 6
    assert all(len(top) == 3 for r in rows for top in r["top_token_ids"])
    prompt_tokens = sum(len(s.body["prompt"]) for s in stub.seen)
    assert first["spend"] == {"prompt_tokens_sent": prompt_tokens, "completion_tokens_sent": 3 * 2 * 5,
                              "cached_prompt_tokens": 0, "cached_completion_tokens": 0,
                              "spent_usd": pytest.approx((2.0 * prompt_tokens + 10.0 * 30) / 1e6),
                              "saved_usd": 0.0}

    again = api.post("/v1/jobs", json=body).json()
    assert again["counts"]["cached"] == 3
    again = wait_for(api, again["id"], timeout=30)
    time.sleep(1.0)  # the worker is still running: give it every chance to send something
    assert len(stub.seen) == 3, "a resubmitted job reached the teacher"
    assert again["spend"] == {"prompt_tokens_sent": 0, "completion_tokens_sent": 0,
                              "cached_prompt_tokens": prompt_tokens, "cached_completion_tokens": 30,
                              "spent_usd": 0.0, "saved_usd": first["spend"]["spent_usd"]}
    assert [r["completion_token_ids"] for r in download_rows(api, again)] == [r["completion_token_ids"] for r in rows]

    worker.stop()  # its stats (HTTP traffic) are recorded when it stops
    metrics = api.get("/metrics").text
    assert f'teachercache_teacher_tokens_sent_total{{kind="prompt",teacher="{TEACHER}"}} {prompt_tokens}.0' in metrics
    assert f'teachercache_teacher_tokens_cached_total{{kind="completion",teacher="{TEACHER}"}} 30.0' in metrics
    assert f'teachercache_teacher_saved_usd_total{{teacher="{TEACHER}"}}' in metrics
    assert f'teachercache_remote_http_requests_total{{teacher="{TEACHER}"}} 3.0' in metrics


def test_a_remote_worker_process_never_imports_vllm_nor_logs_its_key(api, settings, stub, tmp_path):
    """The real `python -m workers` entry point for a remote teacher, in its own process."""
    job = api.post("/v1/jobs", json=batch(2)).json()
    env = {**os.environ, "TEACHERCACHE_DATABASE_URL": settings.database_url,
           "TEACHERCACHE_STATE_DIR": str(settings.state_dir), "TEACHERCACHE_TEACHERS_FILE": str(settings.teachers_file),
           "TEACHERCACHE_FLUSH_S": "0.2", "TEACHERCACHE_CLAIM_POLL_S": "0.1", "TEACHERCACHE_TEACHER": TEACHER,
           KEY_ENV: SECRET, "PYTHONPATH": str(PROJECT_ROOT)}
    report = ("import atexit, sys; atexit.register(lambda: print('VLLM_IMPORTED', 'vllm' in sys.modules, flush=True)); "
              "from workers.cli import main; sys.argv = ['workers']; main()")
    log = tmp_path / "worker.log"
    process = subprocess.Popen([sys.executable, "-c", report], env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                               stderr=log.open("w"), text=True)
    try:
        job = wait_for(api, job["id"], timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 2
    assert process.returncode == 0, log.read_text()[-2000:]
    assert "VLLM_IMPORTED False" in out
    assert len(stub.seen) == 2 and SECRET not in log.read_text()


def test_a_remote_worker_without_its_key_refuses_to_start(rt, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(SystemExit, match=KEY_ENV):
        build_remote_engine(rt.teachers.get(TEACHER))


def test_a_chat_endpoint_is_sent_the_messages_and_its_token_strings_map_back_exactly(api, rt, stub, start_worker):
    from transformers import AutoTokenizer

    tokenizer = stub.tokenizer = AutoTokenizer.from_pretrained(rt.teachers.get(CHAT_TEACHER).folder)
    plain = api.post("/v1/jobs", json={"teacher": CHAT_TEACHER, "requests": [{"prompt": "plain text"}]})
    assert plain.status_code == 422 and "chat endpoint" in plain.text
    messages = [{"role": "user", "content": "Say something."}]
    job = api.post("/v1/jobs", json={"teacher": CHAT_TEACHER, "top_logprobs": 2, "sampling": {"max_tokens": 9},
                                     "requests": [{"custom_id": "c", "messages": messages}]}).json()
    engine = build_remote_engine(rt.teachers.get(CHAT_TEACHER))
    start_worker(engine, teacher=CHAT_TEACHER)
    job = wait_for(api, job["id"], timeout=60)
    engine.close()
    [seen] = stub.seen
    assert seen.path == "/v1/chat/completions" and seen.body["messages"] == messages and "prompt" not in seen.body
    assert seen.body["logprobs"] is True and seen.body["top_logprobs"] == 2 and "top_k" not in seen.body
    [row] = download_rows(api, job)
    # The bytes identify even the three fragments of one CJK character, which all read U+FFFD.
    assert row["completion_token_ids"] == CHAT_ANSWER
    assert row["top_token_ids"][3] == [241, 242] and row["top_logprobs"][3] == [-0.25, -1.25]
    assert row["completion_text"] == tokenizer.decode(CHAT_ANSWER, skip_special_tokens=True)
    assert row["prompt_token_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    return_dict=True)["input_ids"]


def test_a_nul_in_chat_content_for_a_chat_endpoint_teacher_is_a_422_naming_it_and_writes_nothing(api, rt, stub):
    """Such messages are kept in JSONB for the worker to send, and Postgres refuses \\u0000 there:
    before the check this was a DataError and a 500 after the job row had been half written."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a\u0000b"}]
    good = {"custom_id": "good", "messages": [{"role": "user", "content": "fine"}]}
    answer = api.post("/v1/jobs", json={"teacher": CHAT_TEACHER,
                                        "requests": [good, {"custom_id": "bad", "messages": messages}]})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "requests[1].messages[1].content" and "NUL" in error["message"]
    with rt.sessions() as db:
        assert db.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0
        assert db.execute(sa.text("SELECT count(*) FROM requests")).scalar_one() == 0
    assert stub.seen == []


def test_a_remote_teacher_refuses_sampled_soft_labels_with_a_422_and_writes_nothing(api, rt, stub):
    """An OpenAI-compatible endpoint returns at most its top-k: it cannot draw from its full distribution."""
    body = {**batch(2), "soft_labels": {"kind": "sampled", "draws": 50}}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "soft_labels.kind" and "remote" in error["message"]
    with rt.sessions() as db:
        assert db.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0
    assert api.post("/v1/jobs", json={**batch(1), "soft_labels": {"kind": "topk"}}).status_code == 201
