"""The OpenAI Batch API on top of native jobs, driven by the official `openai` package against
the app in-process (real Postgres, scripted-engine worker)."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture
def oai(api, api_key) -> openai.OpenAI:
    # FastAPI's TestClient is an httpx.Client: the openai client sends through it into the app.
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=api, max_retries=0)


def chat_line(i: int, **body) -> dict:
    return {"custom_id": f"c{i}", "method": "POST", "url": CHAT,
            "body": {"model": TEACHER, "messages": [{"role": "user", "content": f"Count to {i}."}],
                     "max_tokens": 6, "logprobs": True, "top_logprobs": 3, **body}}


def completion_line(i: int, **body) -> dict:
    return {"custom_id": f"p{i}", "method": "POST", "url": COMPLETIONS,
            "body": {"model": TEACHER, "prompt": f"Say {i}.", "max_tokens": 5, "logprobs": 2, **body}}


def upload(oai, lines: list) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return oai.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def wait_for_batch(oai, batch_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


def read_jsonl(oai, file_id: str) -> list[dict]:
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def test_chat_batch_output_matches_the_native_job_rows(oai, api, start_worker, rt):
    file_id = upload(oai, [chat_line(i) for i in range(3)])
    assert oai.files.retrieve(file_id).purpose == "batch"
    batch = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == 3
    start_worker(ScriptedEngine())
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 0
    assert batch.error_file_id is None
    job = wait_for(api, batch.metadata["teachercache_job_id"])
    rows = {r["custom_id"]: r for r in download_rows(api, job)}
    teacher = rt.teachers.get(TEACHER)
    lines = read_jsonl(oai, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2"]
    for line in lines:
        row = rows[line["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == TEACHER
        choice = body["choices"][0]
        assert choice["message"]["content"] == row["completion_text"]
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [teacher.decode([t]) for t in row["completion_token_ids"]]
        assert [c["logprob"] for c in content] == pytest.approx(row["token_logprobs"])
        assert [[t["logprob"] for t in c["top_logprobs"]] for c in content] == [
            pytest.approx(tops) for tops in row["top_logprobs"]]
        assert all(len(c["top_logprobs"]) == 3 for c in content)
        assert body["usage"]["prompt_tokens"] == len(row["prompt_token_ids"])


def test_completions_batch_renders_text_completion_logprobs(oai, api, start_worker):
    file_id = upload(oai, [completion_line(i) for i in range(2)])
    batch = oai.batches.create(input_file_id=file_id, endpoint=COMPLETIONS, completion_window="24h")
    start_worker(ScriptedEngine())
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "completed", batch
    job = wait_for(api, batch.metadata["teachercache_job_id"])
    assert job["top_logprobs"] == 2 and job["sampling"]["max_tokens"] == 5
    rows = {r["custom_id"]: r for r in download_rows(api, job)}
    for line in read_jsonl(oai, batch.output_file_id):
        choice = line["response"]["body"]["choices"][0]
        row = rows[line["custom_id"]]
        assert line["response"]["body"]["object"] == "text_completion"
        assert choice["text"] == row["completion_text"]
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"] == pytest.approx(row["token_logprobs"])
        assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == len(row["completion_token_ids"])
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])


def test_failed_request_goes_to_the_error_file(oai, start_worker):
    lines = [completion_line(0), completion_line(1, prompt=[1, 4242])]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint=COMPLETIONS, completion_window="24h")
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    errors = read_jsonl(oai, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["p1"] and "scripted failure" in errors[0]["error"]["message"]
    assert [o["custom_id"] for o in read_jsonl(oai, batch.output_file_id)] == ["p0"]


@pytest.mark.parametrize(
    "bad_line, code",
    [
        ("{not json", "invalid_json_line"),
        ({**chat_line(1), "custom_id": "c0"}, "duplicate_custom_id"),
        ({**chat_line(1), "url": COMPLETIONS}, "mismatched_endpoint"),
        ({**chat_line(1), "method": "GET"}, "invalid_method"),
        (chat_line(1, model="gpt-4o"), "model_not_found"),
        (chat_line(1, model=["x"]), "model_not_found"),
    ],
)
def test_malformed_file_fails_validation_naming_the_line(oai, api, bad_line, code):
    file_id = upload(oai, [chat_line(0), bad_line, chat_line(2)])
    batch = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [(code, 2)], batch.errors
    assert "teachercache_job_id" not in (batch.metadata or {})
    assert api.get("/v1/jobs").json()["data"] == []


def test_cancel_before_any_worker_ends_cancelled(oai, api):
    file_id = upload(oai, [chat_line(i) for i in range(3)])
    batch = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts.failed == 3
    errors = read_jsonl(oai, batch.error_file_id)
    assert [e["error"]["code"] for e in errors] == ["cancelled"] * 3


def test_a_batch_past_its_completion_window_expires_keeping_what_was_done(oai, api, start_worker, rt):
    import sqlalchemy as sa

    from service.openai_batch.models import OpenAIBatch

    done = oai.batches.create(input_file_id=upload(oai, [chat_line(0)]), endpoint=CHAT, completion_window="24h")
    worker = start_worker(ScriptedEngine())
    assert wait_for_batch(oai, done.id).status == "completed"  # c0 is in the cache now
    worker.stop()  # nothing runs the rest: the window runs out first
    batch = oai.batches.create(input_file_id=upload(oai, [chat_line(i) for i in range(3)]), endpoint=CHAT,
                               completion_window="24h")
    assert batch.expires_at == batch.created_at + 24 * 3600 and batch.status == "in_progress"
    with rt.sessions() as db, db.begin():
        db.execute(sa.update(OpenAIBatch).where(OpenAIBatch.id == batch.id)
                   .values(created_at=sa.func.now() - sa.text("interval '25 hours'")))
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert [line["custom_id"] for line in read_jsonl(oai, batch.output_file_id)] == ["c0"]
    errors = read_jsonl(oai, batch.error_file_id)
    assert {e["custom_id"] for e in errors} == {"c1", "c2"}
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_list_pages_newest_first_and_unknown_ids_are_404(oai):
    file_id = upload(oai, [chat_line(0)])
    ids = [oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id for _ in range(3)]
    page = oai.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in oai.batches.list(limit=2, after=page.data[-1].id).data] == [ids[0]]
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-nope")


def test_a_line_that_cannot_run_fails_alone_in_the_error_file(oai, api, start_worker):
    too_long = chat_line(1, messages=[{"role": "user", "content": "x " * 3000}])
    lines = [chat_line(0), "", too_long, chat_line(2, messages=[]), chat_line(3, temperature=11),
             chat_line(4, response_format={"type": "json_object"}), chat_line(5)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    start_worker(ScriptedEngine())
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 4)
    assert [o["custom_id"] for o in read_jsonl(oai, batch.output_file_id)] == ["c0", "c5"]
    errors = read_jsonl(oai, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["c1", "c2", "c3", "c4"]
    assert all(e["response"]["status_code"] == 400 and e["error"] is None for e in errors)
    params = [e["response"]["body"]["error"]["param"] for e in errors]
    assert params == ["body.prompt", "body.messages", "body.temperature", "body.response_format"], errors
    assert "over the teacher's context" in errors[0]["response"]["body"]["error"]["message"]


def test_upload_rejects_other_purposes_and_content_round_trips(oai):
    file_id = upload(oai, [chat_line(0)])
    assert json.loads(oai.files.content(file_id).text) == chat_line(0)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")


def test_output_files_are_written_once_by_the_finalizer_before_any_read(oai, api, start_worker, rt):
    import sqlalchemy as sa

    from service.openai_batch.models import OpenAIBatch, OpenAIFile

    batch = oai.batches.create(input_file_id=upload(oai, [chat_line(0), chat_line(1, logprobs=False, top_logprobs=None)]),
                               endpoint=CHAT, completion_window="24h")
    start_worker(ScriptedEngine())
    wait_for(api, batch.metadata["teachercache_job_id"])  # the native job: the batch itself is never read
    with rt.sessions() as db:
        row = db.get(OpenAIBatch, batch.id)
        assert row.status == "completed" and row.output_file_id is not None and row.completed_at is not None
        files = db.scalar(sa.select(sa.func.count()).select_from(OpenAIFile))
    for _ in range(3):  # reading it (one, or in a list) writes nothing more
        assert oai.batches.retrieve(batch.id).output_file_id == row.output_file_id
        oai.batches.list()
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(OpenAIFile)) == files


def test_a_batch_chooses_sampled_soft_labels_in_its_metadata(oai, api):
    file_id = upload(oai, [chat_line(i) for i in range(2)])
    bad = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                                        "metadata": {"teachercache_soft_labels": '{"kind": "sampled", "draws": 0}'}})
    assert bad.status_code == 422, bad.text
    assert "metadata.teachercache_soft_labels" in bad.text and "draws" in bad.text
    assert oai.batches.list().data == []  # nothing kept
    batch = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                               metadata={"teachercache_soft_labels": '{"kind": "sampled", "draws": 20}'})
    job = api.get(f"/v1/jobs/{batch.metadata['teachercache_job_id']}").json()
    assert job["soft_labels"] == {"kind": "sampled", "draws": 20, "temperature": 1.0, "seed": 0,
                                  "encoding": "float32"}
