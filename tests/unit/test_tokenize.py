"""Turning submitted requests into the exact ids the teacher sees, on a small fake teacher:
text, chat and id prompts meet in one id sequence, score transcripts split where the template
says, and every bad request is refused naming `requests[i].field`."""

from __future__ import annotations

import pytest

from service.errors import ValidationFailed
from service.jobs.schemas import JobCreate
from service.jobs.tokenize import prepare_requests

QUESTION = [{"role": "user", "content": "what is the capital of france ?"}]


def job(requests: list[dict], **extra) -> JobCreate:
    return JobCreate(requests=requests, sampling={"max_tokens": 4}, **extra)


def refusal(body: JobCreate, teacher) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        prepare_requests(body, teacher)
    return caught.value


def test_text_chat_and_id_prompts_become_the_ids_the_teacher_sees(fake_teacher):
    chat_ids = fake_teacher.encode_chat(QUESTION)
    prepared = prepare_requests(job([{"custom_id": "t", "prompt": "hello world"},
                                     {"custom_id": "c", "messages": QUESTION},
                                     {"custom_id": "i", "prompt_token_ids": chat_ids}]), fake_teacher)
    assert [p.custom_id for p in prepared] == ["t", "c", "i"] and [p.index for p in prepared] == [0, 1, 2]
    assert prepared[0].prompt_token_ids == [1, fake_teacher.encode_continuation("hello")[0],
                                            fake_teacher.encode_continuation("world")[0]]
    assert prepared[1].prompt_token_ids == prepared[2].prompt_token_ids == chat_ids
    assert fake_teacher.decode(chat_ids).endswith("assistant")  # the prompt ends with the assistant's header
    assert all(p.response_token_ids is None for p in prepared)


def test_custom_ids_default_to_the_position(fake_teacher):
    prepared = prepare_requests(job([{"prompt": "hello"}, {"prompt": "world"}]), fake_teacher)
    assert [p.custom_id for p in prepared] == ["0", "1"]


def test_a_score_transcript_is_split_into_prompt_and_the_assistant_turn(fake_teacher):
    conversation = QUESTION + [{"role": "assistant", "content": "paris ."}]
    (prepared,) = prepare_requests(job([{"messages": conversation}], mode="score"), fake_teacher)
    assert prepared.prompt_token_ids == fake_teacher.encode_chat(QUESTION)
    assert fake_teacher.decode(prepared.response_token_ids).split()[:2] == ["paris", "."]
    explicit = prepare_requests(job([{"messages": QUESTION, "response": "paris ."}], mode="score"), fake_teacher)[0]
    assert explicit.response_token_ids == fake_teacher.encode_continuation("paris .")


@pytest.mark.parametrize("requests, mode, field, words", [
    ([{"prompt": "hello", "prompt_token_ids": [1]}], "generate", "requests[0].prompt", "exactly one"),
    ([{"prompt": "hello"}, {}], "generate", "requests[1].prompt", "exactly one"),
    ([{"prompt_token_ids": [1, 18]}], "generate", "requests[0].prompt_token_ids", "token id 18"),
    ([{"prompt_token_ids": [-1]}], "generate", "requests[0].prompt_token_ids", "token id -1"),
    ([{"prompt": "hello", "response": "world"}], "generate", "requests[0].response", "only score mode"),
    ([{"prompt": "hello"}], "score", "requests[0].response", "score mode needs"),
    ([{"prompt": "hello", "response_token_ids": [99]}], "score", "requests[0].response_token_ids", "token id 99"),
    ([{"prompt": "hello", "response": ""}], "score", "requests[0].response", "must not be empty"),
    ([{"prompt": "hello " * 30}], "generate", "requests[0].prompt", "over the teacher's context of 32"),
    ([{"custom_id": "a", "prompt": "hello"}, {"custom_id": "a", "prompt": "world"}], "generate",
     "requests[1].custom_id", "duplicate of requests[0]"),
])
def test_bad_requests_are_refused_naming_the_request_and_field(fake_teacher, requests, mode, field, words):
    error = refusal(job(requests, mode=mode), fake_teacher)
    assert error.status_code == 422 and error.details["field"] == field and words in error.message
    assert error.message.startswith(field)
