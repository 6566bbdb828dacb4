"""Validating a batch input file (JSONL) the way OpenAI does, and turning it into one native job.

A native job has one teacher and one set of sampling parameters, so every line of a batch must
name the same model and the same sampling parameters (max_tokens, temperature, top_p, seed, n,
stop, penalties, logprobs/top_logprobs). A line that differs fails validation, naming the line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.jobs.schemas import JobCreate, RequestIn, Sampling
from service.jsonl import text_lines
from service.openai_batch.schemas import BatchError

MAX_REPORTED_ERRORS = 100
# Body fields OpenAI accepts that map onto native sampling parameters (same names).
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "n", "stop", "presence_penalty", "frequency_penalty")


class LineInvalid(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class ParsedLine:
    custom_id: str
    model: str
    request: RequestIn
    shared: dict[str, Any]  # sampling + logprob settings: must be equal on every line


@dataclass(frozen=True)
class ParsedInput:
    teacher: str
    job: JobCreate
    wants_logprobs: bool
    line_numbers: list[int]  # the file line (1-based) of each native request, blank lines skipped


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
    return ParsedLine(custom_id, model, request_of(custom_id, body, endpoint), shared_params(body, endpoint))


def request_of(custom_id: str, body: dict[str, Any], endpoint: str) -> RequestIn:
    if endpoint == "/v1/chat/completions":
        fields = {"messages": body.get("messages")}
    else:
        prompt = body.get("prompt")
        is_token_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        fields = {"prompt_token_ids": prompt} if is_token_ids else {"prompt": prompt}
    try:
        return RequestIn(custom_id=custom_id, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "body." + ".".join(str(p) for p in first["loc"])
        raise LineInvalid("invalid_request", f"{where}: {first['msg']}", where) from None


def shared_params(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """Sampling and logprob settings in native form, defaults filled, so equal settings compare equal."""
    sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    try:
        native = Sampling(**sampling).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "body." + ".".join(str(p) for p in first["loc"])
        raise LineInvalid("invalid_request", f"{where}: {first['msg']}", where) from None
    if endpoint == "/v1/chat/completions":
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            raise LineInvalid("invalid_request", "body.logprobs: must be true or false", "body.logprobs")
        top = count_param(body, "top_logprobs") if wants else 0
    else:
        wants = body.get("logprobs") is not None
        top = count_param(body, "logprobs")
    return {"sampling": native, "top_logprobs": top, "logprobs": bool(wants)}


def count_param(body: dict[str, Any], name: str) -> int:
    """A logprob count: absent/null is 0; anything but a non-negative integer names the field
    (json reads 1e400 as inf, and int() of a string, list or inf would escape as a 500)."""
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LineInvalid("invalid_request", f"body.{name}: must be a non-negative integer", f"body.{name}")
    return value


def check_against_first(line: ParsedLine, first: ParsedLine | None, seen_ids: set[str]) -> None:
    if line.custom_id in seen_ids:
        raise LineInvalid("duplicate_custom_id", f"custom_id {line.custom_id!r} appears more than once", "custom_id")
    if first is None:
        return
    if line.model != first.model:
        raise LineInvalid("mismatched_model", f"model {line.model!r} differs from the first line's {first.model!r}; "
                          "a batch runs on one teacher", "body.model")
    if line.shared != first.shared:
        differing = sorted(differing_params(line.shared, first.shared))
        raise LineInvalid("mismatched_sampling_params",
                          f"{', '.join(differing)} differ from the first line's; all lines of a batch must share "
                          "sampling and logprob parameters", "body")


def differing_params(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    names = {k for k in ("top_logprobs", "logprobs") if a[k] != b[k]}
    return names | {k for k in a["sampling"] if a["sampling"][k] != b["sampling"][k]}


def to_job(lines: list[ParsedLine], line_numbers: list[int]) -> ParsedInput | list[BatchError]:
    shared = lines[0].shared
    try:
        job = job_of(lines, shared)
    except ValidationError as exc:  # a value the job refuses (shared by every line: named on the first)
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return [BatchError(code="invalid_request", message=f"{where}: {first['msg']}", param=where,
                           line=line_numbers[0])]
    return ParsedInput(teacher=lines[0].model, job=job, wants_logprobs=shared["logprobs"], line_numbers=line_numbers)


def job_of(lines: list[ParsedLine], shared: dict[str, Any]) -> JobCreate:
    return JobCreate(teacher=lines[0].model, top_logprobs=shared["top_logprobs"], sampling=Sampling(**shared["sampling"]),
                     requests=[line.request for line in lines])
