"""Turn submitted requests into the exact token ids the teacher will see, or say what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from service.errors import ValidationFailed
from service.jobs.schemas import JobCreate, RequestIn
from service.sampling import Sampling, apply_override
from service.teachers.tokenizer import Teacher


@dataclass(frozen=True)
class PreparedRequest:
    index: int
    custom_id: str
    prompt_token_ids: list[int]
    response_token_ids: list[int] | None
    messages: list[dict[str, Any]] | None = None  # kept only for a chat-endpoint teacher, which is sent them
    # This request's parameters: the job's, with the request's own overrides applied.
    sampling: Sampling = Sampling()
    top_logprobs: int = 0


@dataclass(frozen=True)
class RejectedRequest:
    """A request refused on its own (an OpenAI batch line that cannot run): it fails alone."""

    index: int
    custom_id: str
    error: str
    field: str | None = None  # the field at fault, where one is


Prepared = PreparedRequest | RejectedRequest  # a request ready to write: to run, or failed on its own


def request_parameters(request: RequestIn, job: JobCreate) -> tuple[Sampling, int]:
    """The sampling parameters and top_logprobs one request runs with."""
    top = request.top_logprobs if request.top_logprobs is not None else job.top_logprobs
    return apply_override(job.sampling, request.sampling), top


def parameter_field(index: int, request: RequestIn, name: str) -> str:
    """Where a parameter came from: the request's own override, else the job's default."""
    if name == "top_logprobs":
        return f"requests[{index}].top_logprobs" if request.top_logprobs is not None else "top_logprobs"
    overridden = request.sampling is not None and getattr(request.sampling, name) is not None
    return f"requests[{index}].sampling.{name}" if overridden else f"sampling.{name}"


def invalid(index: int, field: str, message: str) -> ValidationFailed:
    where = f"requests[{index}].{field}"
    return ValidationFailed(f"{where}: {message}", request_index=index, field=where)


def prepare_requests(job: JobCreate, teacher: Teacher,
                     check: Callable[[int, RequestIn], None] = lambda index, request: None,
                     reject_alone: bool = False) -> list[Prepared]:
    """Each request checked (`check`, then its parameters and tokens) and tokenized. With
    `reject_alone` a request that fails its checks becomes a RejectedRequest instead of
    refusing the job (OpenAI's batches fail such a line alone)."""
    seen: dict[str, int] = {}
    prepared: list[Prepared] = []
    assert job.requests is not None  # a file's job is prepared a batch of requests at a time
    for index, request in enumerate(job.requests):
        item: Prepared
        try:
            check(index, request)
            item = prepare_one(index, request, job, teacher)
        except ValidationFailed as exc:
            if not reject_alone:
                raise
            item = RejectedRequest(index, request.custom_id if request.custom_id is not None else str(index),
                                   exc.message, exc.details.get("field"))
        if item.custom_id in seen:
            raise invalid(index, "custom_id", f"duplicate of requests[{seen[item.custom_id]}]")
        seen[item.custom_id] = index
        prepared.append(item)
    return prepared


def prepare_one(index: int, request: RequestIn, job: JobCreate, teacher: Teacher) -> PreparedRequest:
    sampling, top_logprobs = request_parameters(request, job)
    check_teacher_parameters(index, request, job.mode, sampling, top_logprobs, teacher)
    prompt, response = split_prompt(index, request, job.mode, teacher)
    if not prompt:  # an empty text prompt tokenizes to nothing, and an engine cannot start from nothing
        raise invalid(index, "prompt", "the prompt is empty")
    check_token_ids(index, "prompt_token_ids", prompt, teacher.vocab_size)
    if response is not None:
        check_token_ids(index, "response_token_ids", response, teacher.vocab_size)
    check_length(index, job.mode, sampling.max_tokens, prompt, response, teacher.spec.max_model_len)
    custom_id = request.custom_id if request.custom_id is not None else str(index)
    messages = None
    if teacher.spec.takes_messages_only:
        check_chat_request(index, request, job.mode)
        assert request.messages is not None  # check_chat_request refuses a request without
        messages = [m.model_dump() for m in request.messages]
    return PreparedRequest(index, custom_id, prompt, response, messages, sampling, top_logprobs)


def check_teacher_parameters(index: int, request: RequestIn, mode: str, sampling: Sampling, top_logprobs: int,
                             teacher: Teacher) -> None:
    """A request's own parameters against the teacher (the job's defaults are checked once, with the job)."""
    limit = teacher.spec.max_top_logprobs
    if request.top_logprobs is not None and top_logprobs > limit:
        field = parameter_field(index, request, "top_logprobs")
        raise ValidationFailed(f"{field}: {top_logprobs} is above this teacher's maximum of {limit}",
                               request_index=index, field=field)
    if mode == "score" and sampling.n != 1 and request.sampling is not None:
        field = parameter_field(index, request, "n")
        raise ValidationFailed(f"{field}: score mode is teacher-forced and takes n = 1", request_index=index,
                               field=field)


def check_chat_request(index: int, request: RequestIn, mode: str) -> None:
    """A teacher behind a chat endpoint is sent messages; token ids or plain text cannot reach it."""
    if mode != "generate":
        raise invalid(index, "mode", "this teacher is behind a chat endpoint, which cannot score responses")
    if request.messages is None:
        raise invalid(index, "messages", "this teacher is behind a chat endpoint: give messages, not prompt or "
                                         "prompt_token_ids")
    for position, message in enumerate(request.messages):  # the messages are kept in JSONB, which refuses NUL
        if "\x00" in message.content:
            raise invalid(index, f"messages[{position}].content", "contains a NUL character (\\u0000)")


def split_prompt(index: int, request: RequestIn, mode: str, teacher: Teacher) -> tuple[list[int], list[int] | None]:
    given = [f for f in ("prompt", "messages", "prompt_token_ids") if getattr(request, f) is not None]
    if len(given) != 1:
        raise invalid(index, "prompt", f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
    if mode == "generate":
        if request.response is not None or request.response_token_ids is not None:
            raise invalid(index, "response", "only score mode takes a response")
        return prompt_ids(index, request, teacher), None
    return score_pair(index, request, teacher)


def prompt_ids(index: int, request: RequestIn, teacher: Teacher) -> list[int]:
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    if request.messages is not None:
        return chat_ids(index, teacher, [m.model_dump() for m in request.messages])
    assert request.prompt is not None  # split_prompt: exactly one of the three is given
    return teacher.encode_text(request.prompt)


def chat_ids(index: int, teacher: Teacher, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """The chat template's tokens; a template that refuses the conversation (Llama's and Mistral's
    raise on roles that do not alternate, or on a `tool` role) is the caller's 422, not a 500."""
    try:
        return teacher.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise invalid(index, "messages", f"the teacher's chat template refused this conversation: {exc}") from None


def score_pair(index: int, request: RequestIn, teacher: Teacher) -> tuple[list[int], list[int]]:
    """Score mode: the prompt and the response tokens to record the teacher's view of."""
    has_response = request.response is not None or request.response_token_ids is not None
    if request.response is not None and request.response_token_ids is not None:
        raise invalid(index, "response", "give response or response_token_ids, not both")
    if not has_response:
        if request.messages and request.messages[-1].role == "assistant":
            return transcript_pair(index, request, teacher)
        raise invalid(index, "response", "score mode needs response, response_token_ids, or messages ending with the assistant")
    prompt = prompt_ids(index, request, teacher)
    if request.response_token_ids is not None:
        return prompt, list(request.response_token_ids)
    if not request.response:
        raise invalid(index, "response", "must not be empty")
    return prompt, teacher.encode_continuation(request.response)


def transcript_pair(index: int, request: RequestIn, teacher: Teacher) -> tuple[list[int], list[int]]:
    """A whole conversation: the last (assistant) turn exactly as the chat template renders it."""
    assert request.messages is not None  # score_pair sends only a conversation here
    messages = [m.model_dump() for m in request.messages]
    if len(messages) < 2:  # the template renders no prompt from an empty conversation
        raise invalid(index, "messages", "a conversation to score needs a turn before the assistant's")
    prompt = chat_ids(index, teacher, messages[:-1], add_generation_prompt=True)
    full = chat_ids(index, teacher, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise invalid(index, "messages", "the chat template does not render this conversation as prompt + response")
    if len(full) == len(prompt):  # accepted, it would fail every engine attempt with nothing to score
        raise invalid(index, "messages", "the assistant's turn renders to no tokens under the chat template")
    return prompt, full[len(prompt):]


def check_token_ids(index: int, field: str, ids: list[int], vocab_size: int) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return  # min/max run in C; the per-id scan, only to name the bad id, was a hot spot of big jobs
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise invalid(index, field, f"token id {bad} is outside the teacher's vocabulary [0, {vocab_size})")


def check_length(index: int, mode: str, max_tokens: int, prompt: list[int], response: list[int] | None,
                 limit: int) -> None:
    if mode == "score":
        total, what = len(prompt) + len(response or []), "prompt + response"
    else:
        total, what = len(prompt) + max_tokens, "prompt + max_tokens"
    if total > limit:
        field = "response" if mode == "score" else "prompt"
        raise invalid(index, field, f"{what} is {total} tokens, over the teacher's context of {limit}")
