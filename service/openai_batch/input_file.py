"""Validating a batch input file (JSONL) the way OpenAI does, and turning it into one native job.

Every line is its own request, as in OpenAI's Batch API: its body's parameters (max_tokens or
max_completion_tokens, temperature, top_p, seed, stop, n, presence/frequency penalties, logprobs
and top_logprobs, response_format) become that request's own parameters (`requests[i].sampling`,
`requests[i].top_logprobs`) over the native defaults, and whether it asked for logprobs is noted
on it, so its output line carries exactly what it asked for.

What fails the whole batch, with the line numbers (OpenAI's file-level validation): a line that is
not a JSON object, a missing, duplicate or unstorable (NUL, over 512 characters) custom_id, a
method other than POST, a url other than the batch's endpoint, a missing body, a model that is
not one of the service's teachers (or not a string), lines naming different models, an empty
file, and the size limits. Anything else wrong in
a line's body (a parameter of the wrong type or out of range, `1e400`, a negative count, messages
that are not a conversation, a response_format or option this service cannot honour, a prompt too
long for the teacher) fails that line alone: it goes to the error file with its custom_id and the
reason, as OpenAI answers such a request with a 400, and the rest of the batch runs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service.jobs.schemas import JobCreate, RequestIn
from service.jsonl import text_lines
from service.openai_batch.schemas import BatchError
from service.sampling import Sampling, apply_override, openai_names
from service.text import storable_text

MAX_REPORTED_ERRORS = 100
MAX_CUSTOM_ID_CHARS = 512  # as a native request's custom_id
CHAT = "/v1/chat/completions"
# Body fields OpenAI accepts that map onto native sampling parameters (same names, one definition).
SAMPLING_FIELDS = tuple(name for name in openai_names() if name != "max_tokens")
# Options this service cannot honour: a line that sets one (to other than its no-op value) fails alone.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {"stream": (None, False), "echo": (None, False), "suffix": (None,), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []), "best_of": (None, 1), "audio": (None,),
               "prediction": (None,)}
HONOURED_RESPONSE_FORMATS = ("text",)


class LineInvalid(Exception):
    """The whole file is refused: a file-level problem with this line."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class RequestInvalid(Exception):
    """This line's request cannot run: it fails alone (a 400 in the error file)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class LineFailure:
    message: str
    param: str | None


@dataclass(frozen=True)
class ParsedLine:
    custom_id: str
    model: str
    request: RequestIn | LineFailure
    logprobs: bool = False  # the line asked for logprobs (its output line carries them)


@dataclass(frozen=True)
class ParsedInput:
    """One entry per request line, in file order: `job` holds the lines that can run."""

    teacher: str
    job: JobCreate
    lines: list[ParsedLine]
    line_numbers: list[int]  # the file line (1-based) of each request line, blank lines skipped
    runnable: list[int] = field(default_factory=list)  # positions (in `lines`) of job.requests
    logprobs: bool = False  # the job's default: whether a line asked for logprobs (the first runnable's)


def parse_input(data: bytes, endpoint: str, known_models: set[str]) -> ParsedInput | list[BatchError]:
    """The native job for a valid file, or the errors of an invalid one (1-based line numbers)."""
    errors: list[BatchError] = []
    parsed: list[ParsedLine] = []
    line_numbers: list[int] = []
    seen_ids: set[str] = set()
    for number, text in enumerate(jsonl_lines(data), start=1):
        if not text.strip():
            continue
        try:
            line = parse_line(text, endpoint, known_models)
            check_against_first(line, parsed[0] if parsed else None, seen_ids)
        except LineInvalid as exc:
            errors.append(BatchError(code=exc.code, message=exc.message, param=exc.param, line=number))
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        seen_ids.add(line.custom_id)
        parsed.append(line)
        line_numbers.append(number)
    if errors:
        return errors
    if not parsed:
        return [BatchError(code="empty_file", message="the input file has no requests")]
    return to_job(parsed, line_numbers)


def jsonl_lines(data: bytes) -> Iterator[str]:
    """JSONL's lines, as every uploaded file's are read (service/jsonl.py)."""
    return text_lines(io.BytesIO(data))


def parse_line(text: str, endpoint: str, known_models: set[str]) -> ParsedLine:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineInvalid("invalid_json_line", f"this line is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise LineInvalid("invalid_json_line", "this line is nested too deeply to read") from None
    if not isinstance(line, dict):
        raise LineInvalid("invalid_json_line", "each line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineInvalid("missing_required_parameter", "custom_id is required (a non-empty string)", "custom_id")
    check_custom_id(custom_id)
    if line.get("method") != "POST":
        raise LineInvalid("invalid_method", "method must be POST", "method")
    if line.get("url") != endpoint:
        raise LineInvalid("mismatched_endpoint", f"url {line.get('url')!r} differs from the batch endpoint {endpoint}",
                          "url")
    body = line.get("body")
    if not isinstance(body, dict):
        raise LineInvalid("missing_required_parameter", "body is required (a JSON object)", "body")
    model = body.get("model")
    if not isinstance(model, str) or model not in known_models:
        raise LineInvalid("model_not_found", f"model {model!r} is not a teacher of this service", "body.model")
    try:
        top_logprobs, logprobs = logprob_params(body, endpoint)
        request = request_of(custom_id, body, endpoint, top_logprobs)
    except RequestInvalid as exc:
        return ParsedLine(custom_id, model, LineFailure(exc.message, exc.param))
    return ParsedLine(custom_id, model, request, logprobs)


def check_custom_id(custom_id: str) -> None:
    """A line's identity, which even its error line carries: unstorable, the file is refused."""
    try:
        storable_text(custom_id)
    except ValueError as exc:
        raise LineInvalid("invalid_request", f"custom_id: {exc}", "custom_id") from None
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise LineInvalid("invalid_request", f"custom_id: longer than {MAX_CUSTOM_ID_CHARS} characters", "custom_id")


def request_of(custom_id: str, body: dict[str, Any], endpoint: str, top_logprobs: int) -> RequestIn:
    check_supported(body)
    if endpoint == CHAT:
        fields = {"messages": body.get("messages")}
    else:
        prompt = body.get("prompt")
        is_token_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        fields = {"prompt_token_ids": prompt} if is_token_ids else {"prompt": prompt}
    try:
        return RequestIn(custom_id=custom_id, sampling=sampling_of(body), top_logprobs=top_logprobs, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RequestInvalid(f"{body_field(first['loc'], body)}: {first['msg']}", body_field(first["loc"], body)) \
            from None


def body_field(loc: tuple[int | str, ...], body: dict[str, Any]) -> str:
    """The body field a native validation error is about (`sampling.max_tokens` is the line's
    max_completion_tokens when it gave that)."""
    path = [str(p) for p in loc]
    if path[:1] == ["sampling"]:
        path = path[1:]
        if path[:1] == ["max_tokens"] and "max_completion_tokens" in body:
            path[0] = "max_completion_tokens"
    return "body." + ".".join(path)


def sampling_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The line's own sampling parameters, native names, as given (validated by RequestIn)."""
    sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    return sampling or None


def check_supported(body: dict[str, Any]) -> None:
    for name, no_ops in UNSUPPORTED.items():
        if name in body and body[name] not in no_ops:
            raise RequestInvalid(f"body.{name}: not supported by this service", f"body.{name}")
    response_format = body.get("response_format")
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in HONOURED_RESPONSE_FORMATS:
        raise RequestInvalid(f"body.response_format: type {kind!r} is not supported (only 'text': this service "
                             "does not constrain decoding)", "body.response_format")


def logprob_params(body: dict[str, Any], endpoint: str) -> tuple[int, bool]:
    """(top_logprobs, whether the line asked for logprobs) in OpenAI's terms per endpoint:
    chat `logprobs: true` with `top_logprobs: k`; completions `logprobs: k`."""
    if endpoint == CHAT:
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            raise RequestInvalid("body.logprobs: must be true or false", "body.logprobs")
        top = count_param(body, "top_logprobs")
        if top and not wants:
            raise RequestInvalid("body.top_logprobs: needs logprobs set to true", "body.top_logprobs")
        return top, bool(wants)
    top = count_param(body, "logprobs")
    return top, body.get("logprobs") is not None


def count_param(body: dict[str, Any], name: str) -> int:
    """A logprob count: absent/null is 0; anything but a non-negative integer names the field
    (json reads 1e400 as inf, and int() of a string, list or inf would escape as a 500)."""
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestInvalid(f"body.{name}: must be a non-negative integer", f"body.{name}")
    return value


def check_against_first(line: ParsedLine, first: ParsedLine | None, seen_ids: set[str]) -> None:
    if line.custom_id in seen_ids:
        raise LineInvalid("duplicate_custom_id", f"custom_id {line.custom_id!r} appears more than once", "custom_id")
    if first is not None and line.model != first.model:
        raise LineInvalid("mismatched_model", f"model {line.model!r} differs from the first line's {first.model!r}; "
                          "a batch runs on one teacher", "body.model")


def to_job(lines: list[ParsedLine], line_numbers: list[int]) -> ParsedInput:
    """The runnable lines as one native job. Its defaults are the first runnable line's parameters,
    so a file whose lines agree is a job of one parameter set (as before lines could differ) and
    only lines that differ carry parameters of their own."""
    runnable = [i for i, line in enumerate(lines) if isinstance(line.request, RequestIn)]
    requests = [line.request for line in lines if isinstance(line.request, RequestIn)]  # in `runnable`'s order
    first = requests[0] if requests else RequestIn()
    sampling = apply_override(Sampling(), first.sampling)
    job = JobCreate.model_construct(teacher=lines[0].model, mode="generate", top_logprobs=first.top_logprobs or 0,
                                    sampling=sampling, cache="use", requests=requests, metadata={})
    logprobs = bool(runnable) and lines[runnable[0]].logprobs
    return ParsedInput(teacher=lines[0].model, job=job, lines=lines, line_numbers=line_numbers, runnable=runnable,
                       logprobs=logprobs)
