"""The cache, end to end with a scripted engine on a real Postgres: what is computed once,
what is answered without the teacher, what a changed parameter or a cache policy does, and
that the cache outlives the processes. (The cache key on its own: tests/unit/test_cachekey.py.)

"Cost the teacher nothing" is measured twice: by the ScriptedEngine's own counters, and by
/metrics, which sums the engine counters workers store in Postgres.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service import cachekey
from service.http.app import create_app
from service.jobs.finalizer import reconcile
from service.models import Job, Result
from service.results.repository import ResultRepository
from service.runtime import Runtime
from tests.counters import recount_spend
from tests.jobs import bearer, download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
# What the teacher computed; `cached` and the job's own labels are allowed to differ.
COMPUTED = ("prompt_token_ids", "completion_token_ids", "completion_text", "token_logprobs", "top_token_ids",
            "top_logprobs", "finish_reason", "error")


# -- helpers -------------------------------------------------------------------------------

def prompts(ids: range, **extra) -> dict:
    """A job over token-id prompts [7, 8, i]; each i is one distinct cache entry."""
    requests = [{"custom_id": f"p{i}", "prompt_token_ids": [7, 8, i]} for i in ids]
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": 4, "n": 2}, "requests": requests,
            **extra}


def submit(api, body: dict) -> dict:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def computed(row: dict) -> tuple:
    return tuple(str(row[c]) for c in COMPUTED)


def by_custom_id(rows: list[dict]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for row in rows:
        out.setdefault(row["custom_id"], []).append(computed(row))
    return out


def metric(api, name: str) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def engine_requests_in_metrics(api) -> float:
    return metric(api, "teachercache_engine_requests_total")


def run_to_end(api, start_worker, body: dict, engine: ScriptedEngine | None = None) -> dict:
    """Submit, compute on a fresh worker, stop it (so its engine counters reach the database)."""
    job = submit(api, body)
    worker = start_worker(engine or ScriptedEngine())
    job = wait_for(api, job["id"])
    worker.stop()
    assert job["status"] == "succeeded", job
    return job


def result_entry(rt: Runtime, key: str) -> Result:
    with rt.sessions() as db:
        return db.get(Result, key)


def request_keys(rt: Runtime, job_id: str) -> list[str]:
    from service.results.repository import ResultRepository

    with rt.sessions() as db:
        return [row.cache_key for row in ResultRepository(db).assembly_rows(job_id, -1, 1_000_000)]


# -- hits ----------------------------------------------------------------------------------

def test_same_batch_twice_is_computed_once(api, start_worker):
    body = prompts(range(5))
    engine = ScriptedEngine()
    first = run_to_end(api, start_worker, body, engine)
    assert first["counts"]["completed"] == 5 and first["counts"]["cached"] == 0
    assert engine.stats()["requests"] == 5 and engine_requests_in_metrics(api) == 5

    # No worker runs now: the API alone answers the job and assembles its shards.
    second = submit(api, body)
    assert second["counts"] == {"total": 5, "completed": 0, "cached": 5, "failed": 0, "pending": 0, "cancelled": 0}
    second = wait_for(api, second["id"], timeout=10)
    assert second["status"] == "succeeded"
    rows = download_rows(api, second)
    assert all(r["cached"] for r in rows) and len(rows) == 10
    assert by_custom_id(rows) == by_custom_id(download_rows(api, first))
    assert engine.stats()["requests"] == 5 and engine_requests_in_metrics(api) == 5

    stats = api.get("/v1/cache/stats").json()
    assert stats["entries"] == 5 and stats["hits"] == 5 and stats["misses"] == 5
    assert stats["completion_tokens_saved"] == 5 * 2 * 4 and stats["prompt_tokens_saved"] == 5 * 3
    assert stats["tokens_saved"] == 40 + 15 and stats["key_version"] == cachekey.CACHE_KEY_VERSION
    assert metric(api, "teachercache_cache_hits_total") == 5 and metric(api, "teachercache_cache_misses_total") == 5
    assert metric(api, "teachercache_cache_entries") == 5
    assert metric(api, "teachercache_cache_completion_tokens_saved_total") == 40


def test_overlapping_jobs_in_flight_compute_each_shared_prompt_once(api, start_worker):
    first = submit(api, prompts(range(0, 6)))
    second = submit(api, prompts(range(3, 9)))
    assert second["counts"]["cached"] == 0  # nothing computed yet: the shared three wait on one task
    assert metric(api, 'teachercache_tasks{state="pending"}') == 9
    engine = ScriptedEngine()
    worker = start_worker(engine)
    first, second = wait_for(api, first["id"]), wait_for(api, second["id"])
    worker.stop()
    assert first["status"] == second["status"] == "succeeded"
    assert engine.stats()["requests"] == 9 and engine_requests_in_metrics(api) == 9
    rows_a, rows_b = by_custom_id(download_rows(api, first)), by_custom_id(download_rows(api, second))
    assert sorted(rows_a) == [f"p{i}" for i in range(6)] and sorted(rows_b) == [f"p{i}" for i in range(3, 9)]
    assert all(rows_a[f"p{i}"] == rows_b[f"p{i}"] for i in range(3, 6))
    assert all(len(samples) == 2 for samples in [*rows_a.values(), *rows_b.values()])


def test_duplicates_within_a_job_are_computed_once(api, start_worker):
    body = prompts(range(3))
    body["requests"] += [{"custom_id": f"again{i}", "prompt_token_ids": [7, 8, i % 3]} for i in range(6)]
    engine = ScriptedEngine()
    job = run_to_end(api, start_worker, body, engine)
    assert engine.stats()["requests"] == 3
    assert job["counts"]["completed"] == 9
    rows = download_rows(api, job)
    assert [r["request_index"] for r in rows[::2]] == list(range(9))
    grouped = by_custom_id(rows)
    assert all(grouped[f"again{i}"] == grouped[f"p{i % 3}"] for i in range(6))


def test_text_chat_and_token_id_prompts_share_one_entry(api, start_worker, rt):
    teacher = rt.teachers.get(TEACHER)
    chat = [{"role": "user", "content": "Name a colour."}]
    text_job = {**prompts(range(0)), "requests": [{"custom_id": "text", "prompt": "Hello there"},
                                                  {"custom_id": "chat", "messages": chat}]}
    run_to_end(api, start_worker, text_job)
    ids_job = {**prompts(range(0)), "requests": [{"custom_id": "text", "prompt_token_ids": teacher.encode_text("Hello there")},
                                                 {"custom_id": "chat", "prompt_token_ids": teacher.encode_chat(chat)}]}
    assert submit(api, ids_job)["counts"]["cached"] == 2


def test_score_mode_is_cached_per_response(api, start_worker):
    def scored(responses):
        requests = [{"custom_id": f"s{i}", "prompt_token_ids": [7, 8], "response_token_ids": r}
                    for i, r in enumerate(responses)]
        return {"teacher": TEACHER, "mode": "score", "top_logprobs": 2, "requests": requests}

    engine = ScriptedEngine()
    job = run_to_end(api, start_worker, scored([[1, 2, 3], [4, 5]]), engine)
    assert [r["completion_token_ids"] for r in download_rows(api, job)] == [[1, 2, 3], [4, 5]]
    assert engine.stats()["requests"] == 2
    again = submit(api, scored([[4, 5], [1, 2, 3], [1, 2]]))
    assert again["counts"]["cached"] == 2 and again["counts"]["pending"] == 1


# -- what splits the cache and what does not ----------------------------------------------

@pytest.mark.parametrize("change", [
    {"sampling": {"max_tokens": 4, "n": 2, "seed": 1}},
    {"sampling": {"max_tokens": 5, "n": 2}},
    {"sampling": {"max_tokens": 4, "n": 2, "temperature": 0.5}},
    {"sampling": {"max_tokens": 4, "n": 2, "stop": ["\n"]}},
    {"sampling": {"max_tokens": 4, "n": 1}},
    {"top_logprobs": 4},
])
def test_a_changed_parameter_misses(api, start_worker, change):
    run_to_end(api, start_worker, prompts(range(3)))
    assert submit(api, prompts(range(3)))["counts"]["cached"] == 3  # the control: unchanged, it hits
    changed = submit(api, prompts(range(3), **change))
    assert changed["counts"]["cached"] == 0 and changed["counts"]["pending"] == 3
    engine = ScriptedEngine()
    job = run_to_end(api, start_worker, prompts(range(3), **change), engine)
    assert engine.stats()["requests"] == 3 and job["counts"]["cached"] == 0


@pytest.mark.parametrize("base, same", [
    ({"temperature": 0, "top_p": 1.0}, {"temperature": 0, "top_p": 0.5, "seed": 3}),  # greedy
    ({"stop": ["a", "b"]}, {"stop": ["b", "a"]}),
    ({"top_k": -1}, {"top_k": 0}),
    ({}, {"seed": 0}),  # the default seed is the fixed one
])
def test_a_parameter_that_cannot_change_the_output_hits(api, start_worker, base, same):
    def body(extra):
        return prompts(range(3), sampling={"max_tokens": 4, "n": 2, **extra})

    run_to_end(api, start_worker, body(base))
    job = submit(api, body(same))
    assert job["counts"]["cached"] == 3
    assert wait_for(api, job["id"], timeout=10)["status"] == "succeeded"


# -- cache policies ------------------------------------------------------------------------

def test_refresh_recomputes_and_replaces_the_entry(api, start_worker, rt):
    first = run_to_end(api, start_worker, prompts(range(3)))
    keys = request_keys(rt, first["id"])
    before = {k: result_entry(rt, k) for k in keys}

    refresh = submit(api, prompts(range(3), cache="refresh"))
    assert refresh["counts"]["cached"] == 0 and refresh["counts"]["pending"] == 3
    reconcile(rt)  # the repair pass must not answer a refresh from the entry it replaces
    assert api.get(f"/v1/jobs/{refresh['id']}").json()["counts"]["pending"] == 3

    engine = ScriptedEngine()
    worker = start_worker(engine)
    refresh = wait_for(api, refresh["id"])
    worker.stop()
    assert engine.stats()["requests"] == 3 and engine_requests_in_metrics(api) == 6
    after = {k: result_entry(rt, k) for k in keys}
    assert all(after[k].shard_id != before[k].shard_id for k in keys)
    assert all(after[k].created_at > before[k].created_at for k in keys)
    rows = download_rows(api, refresh)
    assert not any(r["cached"] for r in rows)
    assert by_custom_id(rows) == by_custom_id(download_rows(api, first))  # deterministic engine, same rows

    # The replaced entry is the one served from now on.
    again = submit(api, prompts(range(3)))
    assert again["counts"]["cached"] == 3
    assert {result_entry(rt, k).shard_id for k in keys} == {a.shard_id for a in after.values()}


def test_bypass_neither_reads_nor_writes_the_cache(api, start_worker):
    run_to_end(api, start_worker, prompts(range(3)))
    entries = api.get("/v1/cache/stats").json()["entries"]

    engine = ScriptedEngine()
    bypass = run_to_end(api, start_worker, prompts(range(5), cache="bypass"), engine)  # 3 cached, 2 new
    assert bypass["counts"]["cached"] == 0
    assert engine.stats()["requests"] == 5  # read nothing: even the cached three ran
    assert not any(r["cached"] for r in download_rows(api, bypass))
    assert api.get("/v1/cache/stats").json()["entries"] == entries

    later = submit(api, prompts(range(3, 5)))
    assert later["counts"]["cached"] == 0  # wrote nothing: the two new prompts are still misses


def test_bypass_duplicates_are_each_computed(api, start_worker):
    body = prompts(range(1), cache="bypass")
    body["requests"].append({"custom_id": "twin", "prompt_token_ids": [7, 8, 0]})
    engine = ScriptedEngine()
    run_to_end(api, start_worker, body, engine)
    assert engine.stats()["requests"] == 2


# -- durability ----------------------------------------------------------------------------

def test_a_restarted_stack_still_hits(settings, rt, start_worker, api_key):
    body = prompts(range(4))
    with TestClient(create_app(rt), headers=bearer(api_key)) as api:
        first_rows = by_custom_id(download_rows(api, run_to_end(api, start_worker, body)))
    rt.engine.dispose()  # the old process's connections are gone

    restarted = Runtime.from_settings(settings)  # same database, same storage folder
    with TestClient(create_app(restarted), headers=bearer(api_key)) as api:
        job = submit(api, body)
        assert job["counts"]["cached"] == 4
        job = wait_for(api, job["id"], timeout=10)
        assert job["status"] == "succeeded"
        assert by_custom_id(download_rows(api, job)) == first_rows
        assert api.get("/v1/cache/stats").json()["entries"] == 4


# -- scale -----------------------------------------------------------------------------------

def test_a_large_job_is_one_task_per_distinct_prompt(api):
    """9,000 new prompts: their task rows alone are 72,000 bind parameters, over Postgres's
    65,535 for one statement, so the inserts must be batched."""
    body = prompts(range(9000))
    first = submit(api, body)
    assert first["counts"]["pending"] == 9000
    second = submit(api, body)  # all in flight: joined, not queued again
    assert second["counts"]["pending"] == 9000 and second["counts"]["cached"] == 0
    assert metric(api, 'teachercache_tasks{state="pending"}') == 9000


def test_a_finished_job_keeps_the_spend_it_had_when_it_ended(api, start_worker, rt):
    """The spend is kept on the job row as its requests are answered, so reading a job never
    sums its results; it equals that sum (each distinct result once) while it runs and at the end."""
    first = run_to_end(api, start_worker, prompts(range(3)))
    second = submit(api, prompts(range(5)))  # 3 answered from the cache, 2 to compute
    running = api.get(f"/v1/jobs/{second['id']}").json()["spend"]
    assert running["cached_prompt_tokens"] == first["spend"]["prompt_tokens_sent"]
    start_worker(ScriptedEngine())
    second = wait_for(api, second["id"])
    with rt.sessions() as db:
        job = db.get(Job, second["id"])
        summed = recount_spend(db, second["id"])
    assert summed == {False: (job.sent_prompt_tokens, job.sent_completion_tokens),
                      True: (job.cached_prompt_tokens, job.cached_completion_tokens)}
    assert second["spend"]["cached_completion_tokens"] == first["spend"]["completion_tokens_sent"]
    assert second["spend"]["prompt_tokens_sent"] == 2 * first["spend"]["prompt_tokens_sent"] // 3


def test_an_entry_keyed_before_a_parameter_was_added_is_still_found(api, start_worker, rt):
    """Entries stored under the key function of before one definition (kept in the unit tests)
    are found by today's keys, and by the keys of a definition with one more parameter at its
    default: the cache survives adding a parameter."""
    from tests.unit.test_cachekey import SamplingWithANewParameter, old_key

    job = run_to_end(api, start_worker, prompts(range(2)))
    teacher = rt.teachers.get(TEACHER)
    identity = cachekey.teacher_identity(teacher.spec.model or teacher.name, teacher.revision, teacher.tokenizer_hash,
                                         teacher.spec.dtype)
    stored = request_keys(rt, job["id"])
    sampling = {"max_tokens": 4, "n": 2}
    for i, key in enumerate(stored):
        document_key = old_key(sampling, top_logprobs=3, prompt=(7, 8, i), identity=identity)
        assert key == document_key  # keyed as the service always keyed it
        extended = SamplingWithANewParameter(**sampling)
        normal = cachekey.normalize_sampling("generate", extended.values(), SamplingWithANewParameter)
        new_key = cachekey.cache_key(identity, "generate", [7, 8, i], None, normal, 3, SamplingWithANewParameter)
        with rt.sessions() as db:
            assert set(ResultRepository(db).results_for([new_key])) == {key}  # found after adding the parameter
