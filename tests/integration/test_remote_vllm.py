"""The default teacher behind a real `vllm serve` (CPU build) on loopback, registered as a remote
teacher: the same jobs through it and through the local vLLM engine give the same rows.

One server per test session (about a minute to load on 2 cores), killed with its process
group at teardown. docs/remote-teachers.md lists where the two paths may differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.processes import ServerFailed
from bench.vllm_serve import SERVED_NAME, vllm_serve
from service.settings import PROJECT_ROOT, ServiceSettings
from tests.jobs import download_rows, wait_for
from workers.main import build_remote_engine

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

LOCAL, REMOTE, REMOTE_CHAT = "smollm2-135m-instruct", "smollm2-remote", "smollm2-remote-chat"
ATOL = 1e-4  # nats: one model, one engine build, but the server runs its own batches and threads
TIE = 1e-5
SERVER_START_S = 400


_MAX_DIFF = {"value": 0.0, "positions": 0, "reordered_ties": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_agreement():
    yield
    print(f"\nremote vs local: {_MAX_DIFF['positions']} positions, max |logprob diff| = {_MAX_DIFF['value']:.3g} nats, "
          f"{_MAX_DIFF['reordered_ties']} tied top-k entries in another order")


@pytest.fixture(scope="session")
def vllm_server(teacher_model_dir: Path, tmp_path_factory):
    """`vllm serve` with the flags the local adapter uses (bench/vllm_serve.py)."""
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    try:
        with vllm_serve(teacher_model_dir, log, SERVER_START_S) as base_url:
            yield base_url
    except ServerFailed as exc:
        pytest.fail(str(exc))


@pytest.fixture
def settings(tmp_path, database_url, vllm_server) -> ServiceSettings:
    entry = {"name": REMOTE, "revision": "vllm-serve-smollm2", "tokenizer": LOCAL, "max_model_len": 2048,
             "dtype": "float32", "source": {"kind": "remote", "base_url": vllm_server, "model": SERVED_NAME,
                                            "max_concurrency": 4}}
    chat = {**entry, "name": REMOTE_CHAT, "revision": "vllm-serve-smollm2-chat",
            "source": {**entry["source"], "api": "chat"}}
    teachers = tmp_path / "teachers.yaml"
    teachers.write_text(yaml.safe_dump({"teachers": [entry, chat]}))
    return ServiceSettings(database_url=database_url, state_dir=tmp_path / "state", models_dir=PROJECT_ROOT / "models",
                           finalizer_poll_s=0.1, teachers_file=teachers)


def run_job(api, body: dict, start) -> tuple[dict, list[dict]]:
    job = api.post("/v1/jobs", json=body).json()
    worker = start()
    job = wait_for(api, job["id"], timeout=300)
    worker.stop()
    assert job["status"] == "succeeded", job
    return job, download_rows(api, job)


def both_paths(api, rt, start_worker, vllm_engine, body: dict, remote_teacher: str = REMOTE):
    local_job, local = run_job(api, {**body, "teacher": LOCAL}, lambda: start_worker(vllm_engine, teacher=LOCAL))
    remote_engine = build_remote_engine(rt.teachers.get(remote_teacher))
    remote_job, remote = run_job(api, {**body, "teacher": remote_teacher},
                                 lambda: start_worker(remote_engine, teacher=remote_teacher))
    return (local_job, local), (remote_job, remote), remote_engine


def assert_rows_agree(local: list[dict], remote: list[dict]) -> None:
    assert [(r["custom_id"], r["sample_index"]) for r in remote] == [(r["custom_id"], r["sample_index"]) for r in local]
    for want, got in zip(local, remote):
        where = f"{want['custom_id']}/{want['sample_index']}"
        assert got["prompt_token_ids"] == want["prompt_token_ids"], where
        assert got["completion_token_ids"] == want["completion_token_ids"], where
        assert got["completion_text"] == want["completion_text"], where
        assert got["finish_reason"] == want["finish_reason"] and got["error"] is None, where
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=ATOL), where
        _track(got["token_logprobs"], want["token_logprobs"])
        for pos, (ids, lps, want_ids, want_lps) in enumerate(zip(got["top_token_ids"], got["top_logprobs"],
                                                                 want["top_token_ids"], want["top_logprobs"])):
            assert lps == pytest.approx(want_lps, abs=ATOL), f"{where} position {pos}"
            _track(lps, want_lps)
            _MAX_DIFF["positions"] += 1
            for j, (a, b) in enumerate(zip(ids, want_ids)):
                if a != b:  # only where two logprobs tie may the order differ
                    _MAX_DIFF["reordered_ties"] += 1
                    near = [want_lps[n] for n in (j - 1, j + 1) if 0 <= n < len(want_lps)]
                    assert any(abs(want_lps[j] - v) < TIE for v in near), f"{where} position {pos} top-{j}"


def _track(got: list[float], want: list[float]) -> None:
    diffs = [abs(a - b) for a, b in zip(got, want) if a != b]  # equal infinities are no difference
    _MAX_DIFF["value"] = max([_MAX_DIFF["value"], *diffs])


def batch(**sampling) -> dict:
    return {"top_logprobs": 20, "sampling": {"max_tokens": 12, "n": 2, "seed": 7, **sampling}, "requests": [
        {"custom_id": "text", "prompt": "The capital of France is"},
        {"custom_id": "chat", "messages": [{"role": "user", "content": "Name a color."}]},
        {"custom_id": "ids", "prompt_token_ids": [1, 4093, 198, 1780, 314, 216, 33, 29, 33, 47, 2, 198, 1, 520]}]}


def test_a_remote_vllm_serve_gives_the_local_engines_rows(api, rt, start_worker, vllm_engine):
    (_, local), (remote_job, remote), engine = both_paths(api, rt, start_worker, vllm_engine, batch())
    try:
        assert_rows_agree(local, remote)
        assert remote[0]["completion_token_ids"] != remote[1]["completion_token_ids"]  # n = 2: two samples
        assert engine.stats()["http_requests"] == 3
        assert remote_job["spend"]["prompt_tokens_sent"] == sum(len(r["prompt_token_ids"]) for r in remote[::2])
        assert remote_job["spend"]["completion_tokens_sent"] == sum(len(r["completion_token_ids"]) for r in remote)

        # The same job again is answered from the cache: nothing reaches the server.
        again = api.post("/v1/jobs", json={**batch(), "teacher": REMOTE}).json()
        again = wait_for(api, again["id"], timeout=60)
        assert again["counts"]["cached"] == 3 and engine.stats()["http_requests"] == 3
        assert again["spend"]["prompt_tokens_sent"] == 0
        assert again["spend"]["cached_completion_tokens"] == remote_job["spend"]["completion_tokens_sent"]
    finally:
        engine.close()


def test_greedy_with_penalties_and_a_stop_string_agree(api, rt, start_worker, vllm_engine):
    body = batch(temperature=0.0, n=1, repetition_penalty=1.3, presence_penalty=0.5, stop=["."])
    (_, local), (_, remote), engine = both_paths(api, rt, start_worker, vllm_engine, body)
    engine.close()
    assert_rows_agree(local, remote)


def test_score_mode_agrees(api, rt, start_worker, vllm_engine):
    body = {"mode": "score", "top_logprobs": 20, "requests": [
        {"custom_id": "a", "prompt": "The capital of France is", "response": " Paris, of course."},
        {"custom_id": "b", "messages": [{"role": "user", "content": "Name a fruit."},
                                        {"role": "assistant", "content": "A banana."}]}]}
    (_, local), (_, remote), engine = both_paths(api, rt, start_worker, vllm_engine, body)
    engine.close()
    assert all(r["finish_reason"] == "scored" for r in remote)
    assert_rows_agree(local, remote)


def test_the_chat_api_agrees_too(api, rt, start_worker, vllm_engine):
    """Messages to /v1/chat/completions: the server applies the same chat template."""
    body = {"top_logprobs": 20, "sampling": {"max_tokens": 12, "n": 2, "seed": 11}, "requests": [
        {"custom_id": "color", "messages": [{"role": "user", "content": "Name a color."}]},
        {"custom_id": "system", "messages": [{"role": "system", "content": "You answer in French."},
                                             {"role": "user", "content": "What is the capital of Italy?"}]}]}
    (_, local), (_, remote), engine = both_paths(api, rt, start_worker, vllm_engine, body, REMOTE_CHAT)
    engine.close()
    assert_rows_agree(local, remote)
