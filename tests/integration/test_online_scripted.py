"""The synchronous endpoints' control plane with the scripted engine (not a teacher: its
logprobs are a function of the prompt): each prompt is a request of a job in the interactive
lane, the answer waits for it, repeats come from the cache, the lane is claimed ahead of batch
work but leaves it its share, bad input is a 4xx that writes nothing. The numbers against a real
`vllm serve` are in test_online_vllm.py."""

from __future__ import annotations

import time

import numpy as np
import sqlalchemy as sa

from service.db import transaction
from service.queue.repository import TaskRepository
from teachercache.online_format import MEDIA_TYPE, read_scores, read_stream
from tests.jobs import wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def score_body(prompt, k: int = 3, **extra) -> dict:
    return {"model": TEACHER, "prompt": prompt, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": k,
            **extra}


def count(rt, sql: str) -> int:
    with rt.sessions() as db:
        return int(db.scalar(sa.text(sql)))


def test_a_scoring_request_is_answered_by_a_job_and_a_repeat_from_the_cache(api, rt, start_worker):
    engine = ScriptedEngine()
    start_worker(engine)
    sequences = [[1, 2, 3, 4, 5], [7, 8, 9], [11]]
    first = api.post("/v1/completions", json=score_body(sequences))
    assert first.status_code == 200, first.text
    choices = first.json()["choices"]
    assert [len(c["prompt_logprobs"]) for c in choices] == [5, 3, 1]
    assert all(c["prompt_logprobs"][0] is None for c in choices)
    # Position j is the distribution that predicted token j: the actual token comes first.
    for choice, ids in zip(choices, sequences):
        for j, entries in enumerate(choice["prompt_logprobs"][1:], start=1):
            assert list(entries)[0] == str(ids[j]) and 3 <= len(entries) <= 4
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert first.json()["usage"]["prompt_tokens"] == 9
    computed = engine.stats()["requests"]
    assert computed == 2  # the one-token prompt has nothing to score
    again = api.post("/v1/completions", json=score_body(sequences))
    assert again.status_code == 200
    assert engine.stats()["requests"] == computed  # answered from the cache: no new engine work
    assert [c["prompt_logprobs"] for c in again.json()["choices"]] == [c["prompt_logprobs"] for c in choices]
    jobs = api.get("/v1/jobs").json()["data"]
    assert {j["mode"] for j in jobs} == {"score"} and all(j["metadata"] == {"source": "online"} for j in jobs)
    assert jobs[0]["counts"]["cached"] == 2  # the tenant's job records the hits (spend, limits)


def test_an_online_job_ends_without_job_shards_and_its_results_stay_cached(api, rt, start_worker):
    """The answer is read from the result shards: the finalizer ends the job without writing
    job shards nobody downloads, and the result shards stay the cache."""
    engine = ScriptedEngine()
    start_worker(engine)
    sequences = [[1, 2, 3, 4], [7, 8, 9]]
    assert api.post("/v1/completions", json=score_body(sequences)).status_code == 200
    [job] = api.get("/v1/jobs").json()["data"]
    job = wait_for(api, job["id"])
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 2
    assert api.get(f"/v1/jobs/{job['id']}/shards").json()["shards"] == []
    assert count(rt, "SELECT count(*) FROM shards WHERE kind = 'job'") == 0
    assert count(rt, "SELECT count(*) FROM shards WHERE kind = 'result'") >= 1
    batch = {"teacher": TEACHER, "mode": "score", "top_logprobs": 3,
             "requests": [{"prompt_token_ids": s[:1], "response_token_ids": s[1:]} for s in sequences]}
    computed = engine.stats()["requests"]
    reused = wait_for(api, api.post("/v1/jobs", json=batch).json()["id"])  # a batch job: assembled as ever
    assert reused["counts"]["cached"] == 2 and engine.stats()["requests"] == computed
    assert len(reused["shards"]) == 1


def test_generation_and_echo_with_one_token(api, start_worker):
    start_worker(ScriptedEngine())
    body = {"model": TEACHER, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "logprobs": 2}
    answer = api.post("/v1/completions", json=body).json()
    [choice] = answer["choices"]
    assert len(choice["logprobs"]["tokens"]) == 4 and choice["prompt_logprobs"] is None
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                               "prompt_tokens_details": None, "completion_tokens_details": None}
    echo = api.post("/v1/completions", json={**body, "max_tokens": 1, "echo": True}).json()["choices"][0]
    assert len(echo["logprobs"]["tokens"]) == 4 and echo["logprobs"]["token_logprobs"][0] is None
    assert len(echo["prompt_logprobs"]) == 3


def test_chat_scores_its_rendered_prompt_with_prompt_logprobs(api, start_worker):
    start_worker(ScriptedEngine())
    body = {"model": TEACHER, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 1,
            "temperature": 0}
    plain = api.post("/v1/chat/completions", json=body).json()
    assert plain["prompt_logprobs"] is None
    scored = api.post("/v1/chat/completions", json={**body, "prompt_logprobs": 2}).json()
    positions = scored["prompt_logprobs"]
    assert len(positions) == scored["usage"]["prompt_tokens"] and positions[0] is None  # vLLM's layout
    assert all(2 <= len(p) <= 3 for p in positions[1:])  # the top-2, and the token itself where outside them
    refused = api.post("/v1/chat/completions", json={**body, "prompt_logprobs": 10_000})
    assert refused.status_code == 400 and "prompt_logprobs" in refused.text


def test_arrow_answer_is_the_json_answer_in_columns(api, start_worker):
    start_worker(ScriptedEngine())
    sequences = [[1, 2, 3, 4, 5], [7, 8, 9]]
    as_json = api.post("/v1/completions", json=score_body(sequences, k=4)).json()
    binary = api.post("/v1/completions", json=score_body(sequences, k=4), headers={"Accept": MEDIA_TYPE})
    assert binary.status_code == 200 and binary.headers["content-type"] == MEDIA_TYPE
    scores = read_scores(read_stream(binary.content), [len(s) for s in sequences])
    assert scores.top_ids.shape == (2, 5, 4) and np.isnan(scores.token_logprobs[:, 0]).all()
    for b, choice in enumerate(as_json["choices"]):
        expected = choice["logprobs"]["token_logprobs"][1:]
        np.testing.assert_allclose(scores.token_logprobs[b, 1:len(sequences[b])], expected, rtol=0, atol=0)
    assert np.isnan(scores.token_logprobs[1, 3:]).all()  # padding past the shorter sequence


def test_bad_input_is_a_400_in_vllms_shape_and_writes_nothing(api, rt):
    before = count(rt, "SELECT count(*) FROM jobs")
    cases = {
        "unknown model": ({**score_body([1, 2]), "model": "nope"}, 404, "model"),
        "logprobs above the maximum": (score_body([1, 2], k=50), 400, "logprobs"),
        "too long": (score_body(list(range(1, 2100))), 400, "input_tokens"),
        "empty text": (score_body(""), 400, "prompt"),
        "empty list": (score_body([]), 400, None),
        "a float id": (score_body([1, 1.5]), 400, "body.prompt.1"),
        "a string id": (score_body([1, "x"]), 400, "body.prompt.1"),
        "an id outside the vocabulary": (score_body([1, 10**6]), 400, None),
        "a negative temperature": ({**score_body([1, 2]), "temperature": -1}, 400, "temperature"),
        "stream": ({**score_body([1, 2]), "stream": True}, 400, "stream"),
        "not json": (None, 400, None),
    }
    for name, (body, status, param) in cases.items():
        response = api.post("/v1/completions", json=body) if body is not None else \
            api.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"})
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, (name, error)
        if param is not None:
            assert error["param"] == param, (name, error)
    assert count(rt, "SELECT count(*) FROM jobs") == before


def test_models_and_health(api, app):
    from fastapi.testclient import TestClient

    models = api.get("/v1/models").json()
    assert models["object"] == "list" and TEACHER in [m["id"] for m in models["data"]]
    assert TestClient(app).get("/health").status_code == 200  # no key: a liveness probe


def test_a_request_waits_with_a_timeout_and_a_clear_error(api, rt, monkeypatch):
    monkeypatch.setattr(rt.settings, "online_timeout_s", 0.3)
    response = api.post("/v1/completions", json=score_body([1, 2, 3]))  # no worker runs
    assert response.status_code == 504 and "did not answer within" in response.json()["error"]["message"]
    [job] = api.get("/v1/jobs").json()["data"]
    assert wait_for(api, job["id"])["status"] == "cancelled"  # its requests are no longer handed out


def test_the_interactive_lane_is_claimed_first_but_leaves_batch_work_its_share(api, rt):
    batch = {"teacher": TEACHER, "mode": "score", "top_logprobs": 2,
             "requests": [{"prompt_token_ids": [1, 100 + i], "response_token_ids": [2, 3]} for i in range(20)]}
    assert api.post("/v1/jobs", json=batch).status_code == 201
    from service.jobs.schemas import JobCreate
    from service.jobs.service import JobService

    online = JobCreate.model_validate({**batch, "requests": [
        {"prompt_token_ids": [5, 500 + i], "response_token_ids": [6]} for i in range(20)]})
    with transaction(rt.sessions) as db:
        JobService(db, "alpha").submit(online, rt.teachers.get(TEACHER), interactive=True)
    with transaction(rt.sessions) as db:
        claimed = TaskRepository(db).claim(TEACHER, "w", 8, 30.0, interactive_limit=6, batch_limit=8)
    assert sorted(t.interactive for t in claimed) == [False] * 2 + [True] * 6  # the lane first, batch its share
    with transaction(rt.sessions) as db:  # with no room for batch work, only the lane is claimed
        claimed = TaskRepository(db).claim(TEACHER, "w", 8, 30.0, interactive_limit=8, batch_limit=0)
    assert [t.interactive for t in claimed] == [True] * 8
    with transaction(rt.sessions) as db:  # a batch task an interactive request joins moves to the lane
        JobService(db, "alpha").submit(JobCreate.model_validate({**batch, "requests": batch["requests"][-1:]}),
                                       rt.teachers.get(TEACHER), interactive=True)
    assert count(rt, "SELECT count(*) FROM tasks WHERE interactive AND response_token_ids = '{2,3}'") == 1


def test_interactive_requests_overtake_a_busy_batch_job(api, rt, start_worker):
    """A worker busy with a batch job (a slow engine) still answers an interactive request before
    the batch job ends: the lane is claimed first and the worker keeps room for it."""
    batch = {"teacher": TEACHER, "mode": "generate", "top_logprobs": 1, "sampling": {"max_tokens": 8},
             "requests": [{"prompt_token_ids": [1, 200 + i]} for i in range(60)]}
    job = api.post("/v1/jobs", json=batch).json()
    start_worker(ScriptedEngine(step_delay_s=0.05, tokens_per_step=1), max_inflight=8, interactive_reserve=2)
    response = api.post("/v1/completions", json=score_body([3, 4, 5]))
    assert response.status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}").json()["counts"]["pending"] > 0  # the batch job is still running


def test_client_score_returns_padded_arrays_from_the_live_service(rt, api_key, start_worker):
    import teachercache as tc
    from service.http.app import create_app
    from tests.integration.test_client_live import serve_on_loopback

    start_worker(ScriptedEngine())
    sequences = [[1, 2, 3, 4], [9, 8]]
    with serve_on_loopback(create_app(rt)) as url, tc.Client(url, api_key=api_key) as client:
        scores = client.score(sequences, top_logprobs=3)
        as_json = client._json("POST", "/v1/completions", json=score_body(sequences, k=3))
    assert scores.token_logprobs.shape == (2, 4) and scores.top_ids.shape == (2, 4, 3)
    assert scores.lengths.tolist() == [4, 2]
    entries = as_json["choices"][0]["prompt_logprobs"][1]
    ranked = sorted((e["rank"], int(tid)) for tid, e in entries.items() if e["rank"] is not None and e["rank"] <= 3)
    assert scores.top_ids[0, 1].tolist() == [tid for _, tid in ranked]
    np.testing.assert_array_equal(scores.token_logprobs[0, 1:],
                                  np.float32(as_json["choices"][0]["logprobs"]["token_logprobs"][1:]))
    tensors = scores.torch()
    assert tuple(tensors["top_logprobs"].shape) == (2, 4, 3)


def test_a_full_worker_claims_a_trainers_batch_into_its_reserve_at_once(api, rt, start_worker, monkeypatch):
    """With every place of max_inflight held by batch work, the reserve takes the whole
    interactive batch in one claim (the batch share bounds only places batch work could take)."""
    batch = {"teacher": TEACHER, "mode": "generate", "top_logprobs": 1, "sampling": {"max_tokens": 2000},
             "requests": [{"prompt_token_ids": [1, 300 + i]} for i in range(20)]}
    api.post("/v1/jobs", json=batch)
    worker = start_worker(ScriptedEngine(step_delay_s=0.05, tokens_per_step=1), max_inflight=8,
                          interactive_reserve=4, drain_s=0.5)
    deadline = time.monotonic() + 30
    while worker.loop.held.batch_count() < 8:  # full of batch work, which runs for minutes
        assert time.monotonic() < deadline, "the worker did not fill up with batch work"
        time.sleep(0.05)
    claims: list[int] = []
    claim = TaskRepository.claim
    monkeypatch.setattr(TaskRepository, "claim", lambda self, *a, **kw: (
        lambda tasks: claims.append(sum(t.interactive for t in tasks)) or tasks)(claim(self, *a, **kw)))
    response = api.post("/v1/completions", json=score_body([[3, 4, 5], [6, 7], [8, 9, 10], [11, 12]]))
    assert response.status_code == 200, response.text
    assert 4 in claims, claims  # not 3, then 1


class RecordingEngine(ScriptedEngine):
    """Records, at each step, how many batch (generate) and interactive (score) requests run."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: list[tuple[int, int]] = []

    def step(self):
        modes = [r.mode for r in self.running.values()]
        self.steps.append((modes.count("generate"), modes.count("score")))
        return super().step()


def test_batch_sequences_that_end_are_not_replaced_while_interactive_work_runs(api, start_worker):
    """Batch work keeps its share of the engine (batch_share of max_inflight: 2 of 8) while a
    trainer's request runs; the places its other sequences leave go to nobody until it ends."""
    batch = {"teacher": TEACHER, "mode": "generate", "top_logprobs": 1, "sampling": {"max_tokens": 3},
             "requests": [{"prompt_token_ids": [1, 400 + i]} for i in range(400)]}
    job = api.post("/v1/jobs", json=batch).json()
    engine = RecordingEngine(step_delay_s=0.02, tokens_per_step=1)
    start_worker(engine, max_inflight=8, interactive_reserve=4, batch_share=0.25, drain_s=0.5)
    deadline = time.monotonic() + 30
    while not any(b >= 6 for b, _ in engine.steps):  # the engine is full of batch work
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = api.post("/v1/completions", json=score_body([3] + list(range(10, 70))))  # 60 steps to score
    assert response.status_code == 200, response.text
    during = [b for b, i in engine.steps if i]
    assert len(during) >= 30
    assert max(during[10:]) <= 2, during  # after the first sequences end: the batch share only
    assert sum(b > 0 for b in during) >= len(during) // 4, during  # ... and batch work still runs beside it
    assert api.get(f"/v1/jobs/{job['id']}").json()["counts"]["pending"] > 0
