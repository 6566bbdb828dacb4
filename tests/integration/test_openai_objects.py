"""What else the official `openai` client reads of batches and files: `usage` and `model` on the
batch, `output_expires_after` on create and `expires_at` on the files it produced, listing files
and deleting them."""

from __future__ import annotations

import openai
import pytest

from tests.integration.test_openai_batch import CHAT, TEACHER, chat_line, oai, read_jsonl, upload, wait_for_batch  # noqa: F401
from workers.scripted_engine import ScriptedEngine


def test_batch_usage_and_model_sum_its_output_lines_and_count_the_cache(oai, start_worker):
    file_id = upload(oai, [chat_line(i) for i in range(3)])
    start_worker(ScriptedEngine())
    first = wait_for_batch(oai, oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id)
    assert first.model == TEACHER and first.usage is not None
    lines = [line["response"]["body"]["usage"] for line in read_jsonl(oai, first.output_file_id)]
    assert first.usage.input_tokens == sum(u["prompt_tokens"] for u in lines) > 0
    assert first.usage.output_tokens == sum(u["completion_tokens"] for u in lines) > 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert first.usage.input_tokens_details.cached_tokens == 0
    again = wait_for_batch(oai, oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id)
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens == first.usage.input_tokens


def test_output_expires_after_sets_the_output_files_expiry(oai, start_worker):
    start_worker(ScriptedEngine())
    lines = [chat_line(0), chat_line(1, temperature=11)]  # one output line, one error line
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h",
                               output_expires_after={"anchor": "created_at", "seconds": 7200})
    batch = wait_for_batch(oai, batch.id)
    for file_id in (batch.output_file_id, batch.error_file_id):
        produced = oai.files.retrieve(file_id)
        assert produced.purpose == "batch_output"
        assert produced.expires_at == pytest.approx(produced.created_at + 7200, abs=2)
    assert oai.files.retrieve(batch.input_file_id).expires_at is None


def test_output_expires_after_out_of_range_is_refused(oai):
    with pytest.raises(openai.UnprocessableEntityError):
        oai.batches.create(input_file_id=upload(oai, [chat_line(0)]), endpoint=CHAT, completion_window="24h",
                           output_expires_after={"anchor": "created_at", "seconds": 60})


def test_files_list_pages_filters_by_purpose_and_delete_removes_one(oai, start_worker):
    ids = [upload(oai, [chat_line(i)]) for i in range(3)]
    listed = oai.files.list()
    assert [f.id for f in listed.data] == ids[::-1]
    page = oai.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    assert [f.id for f in oai.files.list(limit=2, order="asc", after=ids[1]).data] == [ids[2]]
    start_worker(ScriptedEngine())
    batch = wait_for_batch(oai, oai.batches.create(input_file_id=ids[0], endpoint=CHAT, completion_window="24h").id)
    assert [f.id for f in oai.files.list(purpose="batch_output").data] == [batch.output_file_id]

    deleted = oai.files.delete(ids[0])  # the input file of a finished batch: the batch keeps its id
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        oai.files.content(ids[0])
    with pytest.raises(openai.NotFoundError):
        oai.files.delete(ids[0])
    assert oai.batches.retrieve(batch.id).input_file_id == ids[0]
    assert ids[0] not in [f.id for f in oai.files.list().data]


def test_expired_output_files_are_swept_with_their_objects(oai, start_worker, rt):
    import sqlalchemy as sa

    from service.openai_batch.models import OpenAIFile
    from service.results.retention import sweep

    start_worker(ScriptedEngine())
    batch = oai.batches.create(input_file_id=upload(oai, [chat_line(0)]), endpoint=CHAT, completion_window="24h",
                               output_expires_after={"anchor": "created_at", "seconds": 3600})
    batch = wait_for_batch(oai, batch.id)
    with rt.sessions() as db:
        path = db.get(OpenAIFile, batch.output_file_id).path
    assert sweep(rt).files == 0  # not yet expired
    with rt.sessions() as db, db.begin():
        db.execute(sa.update(OpenAIFile).where(OpenAIFile.id == batch.output_file_id)
                   .values(expires_at=sa.func.now() - sa.text("interval '1 second'")))
    assert sweep(rt).files == 1
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(batch.output_file_id)
    assert rt.storage.stat(path) is None
    assert oai.files.retrieve(batch.input_file_id).id == batch.input_file_id  # no expiry: kept
