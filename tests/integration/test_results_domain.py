"""The results domain end to end with the scripted engine: a job that cannot be assembled fails
alone, and a missing or damaged result shard is recomputed instead of copied."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import service.results.assemble as assemble
from service.models import Job, Shard
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def batch(tag: str, n: int = 4) -> dict:
    # Distinct per tag in every process (hash() of a str changes with PYTHONHASHSEED, and two tags
    # could collide mod 1000).
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": 6},
            "requests": [{"custom_id": f"{tag}{i}", "prompt_token_ids": [1, 2, 100 + sum(map(ord, tag)), i]} for i in range(n)]}


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"finalize_max_attempts": 3, "finalize_backoff_s": 0.05})


def test_a_job_whose_assembly_keeps_failing_ends_failed_and_does_not_hold_up_another(api, rt, start_worker,
                                                                                     monkeypatch):
    poisoned = api.post("/v1/jobs", json=batch("p")).json()["id"]
    other = api.post("/v1/jobs", json=batch("o")).json()["id"]  # created after: behind it in the claim order
    real = assemble.job_batches

    def overflowing(jobs, results, storage, job, batch_rows):
        if job.id == poisoned:
            raise OverflowError("offsets overflow int32")  # deterministic: every attempt fails the same way
        return real(jobs, results, storage, job, batch_rows)

    monkeypatch.setattr(assemble, "job_batches", overflowing)
    start_worker(ScriptedEngine())
    assert wait_for(api, other)["status"] == "succeeded"
    failed = wait_for(api, poisoned)
    assert failed["status"] == "failed" and failed["shards"] in (None, [])
    with rt.sessions() as db:
        job = db.get(Job, poisoned)
        assert job.finalize_attempts == 3 and "OverflowError: offsets overflow int32" in job.error


@pytest.mark.parametrize("storage_uri, storage_download", [("local", "proxy"), ("s3", "proxy")], indirect=True)
def test_a_deleted_and_a_damaged_result_shard_are_recomputed_and_the_job_succeeds(api, rt, start_worker):
    worker = start_worker(ScriptedEngine())
    first = [wait_for(api, api.post("/v1/jobs", json=batch(tag)).json()["id"]) for tag in ("a", "b")]
    expected = [row for job in first for row in download_rows(api, job)]
    with rt.sessions() as db:
        sources = list(db.scalars(sa.select(Shard).where(Shard.kind == "result").order_by(Shard.created_at)))
    assert len(sources) == 2  # one per job: each was computed and indexed on its own
    rt.storage.delete(sources[0].path)
    content = bytearray(rt.storage.read_bytes(sources[1].path))
    content[len(content) // 2] ^= 0xFF  # one flipped byte, same size: only the sha256 can tell
    rt.storage.write_bytes(sources[1].path, bytes(content))

    both = batch("a")
    both["requests"] += batch("b")["requests"]  # every request answered from the (damaged) cache
    again = api.post("/v1/jobs", json=both).json()
    assert again["counts"]["cached"] == 8
    unrelated = api.post("/v1/jobs", json=batch("c")).json()
    assert wait_for(api, unrelated["id"])["status"] == "succeeded"
    again = wait_for(api, again["id"])
    assert again["status"] == "succeeded" and again["counts"]["completed"] == 8
    rows = download_rows(api, again)
    strip = ("request_index", "cached")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
           [{k: v for k, v in r.items() if k not in strip} for r in expected]
    assert [r["request_index"] for r in rows] == list(range(8))
    assert not any(r["cached"] for r in rows)  # recomputed, not copied from the damaged shards
    # a and b once each, then all 8 again (both shards were dropped whole), and c: nothing else
    assert worker.loop.engine.counters["requests"] == 4 + 4 + 8 + 4


@pytest.mark.parametrize("storage_uri, storage_download", [("local", "proxy"), ("s3", "proxy")], indirect=True)
def test_deleting_a_job_removes_its_rows_and_shards_but_keeps_the_cache(api, rt, start_worker):
    start_worker(ScriptedEngine())
    job = wait_for(api, api.post("/v1/jobs", json=batch("d")).json()["id"])
    url = job["shards"][0]["url"]
    with rt.sessions() as db:
        paths = list(db.scalars(sa.select(Shard.path).where(Shard.job_id == job["id"])))
    response = api.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert api.get(url).status_code == 404
    assert all(rt.storage.stat(path) is None for path in paths)
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 404
    again = api.post("/v1/jobs", json=batch("d")).json()
    assert again["counts"]["cached"] == 4  # the cache outlives the job


def test_a_job_still_running_cannot_be_deleted(api):
    job = api.post("/v1/jobs", json=batch("r")).json()  # no worker: it stays queued
    response = api.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_a_job_is_finalized_while_another_transaction_holds_a_row_that_references_it(rt):
    """A worker paused inside a transaction that inserted a row referencing the job (its progress
    snapshot: the foreign key holds FOR KEY SHARE on the job until commit) must not stop the job
    from being finalized: this was test_faults' occasional job stuck in `finalizing` while its
    SIGSTOPped worker slept."""
    from bench.bench_assembly import seed_job
    from service.jobs.finalizer import finalize_ready

    job_id = seed_job(rt, 8)
    with rt.engine.connect() as paused:  # the paused worker's open transaction
        paused.execute(sa.text("INSERT INTO job_progress (job_id, completed, cached, failed) VALUES (:id, 0, 8, 0)"),
                       {"id": job_id})
        assert finalize_ready(rt) == 1
        paused.rollback()
    with rt.sessions() as db:
        job = db.get(Job, job_id)
        assert job.status == "succeeded"
        assert sum(s.rows for s in db.scalars(sa.select(Shard).where(Shard.job_id == job_id))) == 8
