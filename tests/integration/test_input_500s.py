"""Inputs that used to answer 500 (or be accepted, then fail every attempt): a 4xx naming the
request and field, and nothing written."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from jinja2 import TemplateError

from service.errors import ValidationFailed
from service.jobs.schemas import RequestIn
from service.jobs.tokenize import check_chat_request
from service.models import Job
from service.teachers.tokenizer import Teacher


def jobs_written(rt) -> int:
    with rt.sessions() as db:
        return db.scalar(sa.select(sa.func.count()).select_from(Job))


def test_a_chat_template_that_raises_is_a_422_naming_the_messages(api, rt, monkeypatch):
    def refuse(self, messages, add_generation_prompt=True):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(Teacher, "encode_chat", refuse)
    body = {"requests": [{"prompt": "fine"}, {"messages": [{"role": "user", "content": "a"},
                                                           {"role": "user", "content": "b"}]}]}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "requests[1].messages" and "alternate" in error["message"]
    assert jobs_written(rt) == 0


def test_a_score_transcript_whose_assistant_turn_renders_to_nothing_is_a_422(api, rt, monkeypatch):
    monkeypatch.setattr(Teacher, "encode_chat", lambda self, messages, add_generation_prompt=True: [1, 2, 3])
    body = {"mode": "score", "requests": [{"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": ""}]}]}
    answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "requests[0].messages", answer.text
    assert jobs_written(rt) == 0


def test_nul_in_chat_content_for_a_chat_endpoint_teacher_names_the_field():
    request = RequestIn(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "a\x00b"}])
    with pytest.raises(ValidationFailed) as refused:
        check_chat_request(4, request, "generate")
    assert refused.value.details["field"] == "requests[4].messages[1].content"
