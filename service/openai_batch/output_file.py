"""Rendering a finished job's Parquet rows as OpenAI batch output / error lines.

Logprobs are the teacher's raw distribution (see DESIGN.md), rendered in OpenAI's format:
chat `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, completions
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}` with offsets
counted from the start of the completion text.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Any

Decode = Callable[[int], str]
Row = dict[str, Any]  # one sample of a job shard, as pyarrow's to_pylist gives it
CHAT = "/v1/chat/completions"


def request_groups(rows: Iterable[dict[str, Any]]) -> Iterable[tuple[int, list[dict[str, Any]]]]:
    """Rows of a job grouped per request. Job shards hold them in request order, samples in
    order (the shard contract), so this streams: one request's rows in memory at a time."""
    for index, group in groupby(rows, key=lambda r: r["request_index"]):
        yield index, list(group)


def request_error(samples: list[dict[str, Any]]) -> str | None:
    errors = [s["error"] or "failed" for s in samples if s["finish_reason"] == "error"]
    return errors[0] if errors else None


def success_line(samples: list[dict[str, Any]], endpoint: str, model: str, created: int, wants_logprobs: bool,
                 decode: Decode) -> str:
    request_id = f"req_{uuid.uuid4().hex}"
    body = response_body(samples, endpoint, model, created, wants_logprobs, decode, request_id)
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": samples[0]["custom_id"],
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    return json.dumps(line)


def asked(row: dict[str, Any]) -> dict[str, Any]:
    """The request's own parameters and notes (the row's `parameters`; empty: the job's)."""
    return json.loads(row["parameters"]) if row.get("parameters") else {}


def refused_line(custom_id: str, message: str, param: str | None) -> str:
    """A line that could not run, as OpenAI writes a request its API answered 400."""
    request_id = f"req_{uuid.uuid4().hex}"
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": request_id, "body": body}, "error": None}
    return json.dumps(line)


def error_line(custom_id: str, message: str, expired: bool = False) -> str:
    """A failed request's line; requests left undone when the window ran out are `batch_expired`."""
    code = "batch_expired" if expired else "cancelled" if message == "cancelled" else "request_failed"
    message = "the batch's completion window ran out before this request was run" if expired else message
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
    return json.dumps(line)


def response_body(samples: list[Row], endpoint: str, model: str, created: int, wants_logprobs: bool, decode: Decode,
                  request_id: str) -> dict[str, Any]:
    chat = endpoint == CHAT
    choices = [chat_choice(s, wants_logprobs, decode) if chat else text_choice(s, wants_logprobs, decode)
               for s in samples]
    prompt_tokens = len(samples[0]["prompt_token_ids"])
    completion_tokens = sum(len(s["completion_token_ids"]) for s in samples)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chat_choice(sample: Row, wants_logprobs: bool, decode: Decode) -> dict[str, Any]:
    return {"index": sample["sample_index"], "message": {"role": "assistant", "content": sample["completion_text"]},
            "logprobs": chat_logprobs(sample, decode) if wants_logprobs else None,
            "finish_reason": sample["finish_reason"]}


def text_choice(sample: Row, wants_logprobs: bool, decode: Decode) -> dict[str, Any]:
    return {"index": sample["sample_index"], "text": sample["completion_text"],
            "logprobs": completion_logprobs(sample, decode) if wants_logprobs else None,
            "finish_reason": sample["finish_reason"]}


# What OpenAI writes for a token the model gives (about) no probability: a logprob of -9999.0,
# never -Infinity, which strict JSON parsers (and most languages' standard ones) reject.
OPENAI_LOGPROB_FLOOR = -9999.0


def openai_logprob(logprob: float) -> float:
    value = float(logprob)
    return value if math.isfinite(value) and value > OPENAI_LOGPROB_FLOOR else OPENAI_LOGPROB_FLOOR


def token_entry(token_id: int, logprob: float, decode: Decode) -> dict[str, Any]:
    token = decode(token_id)
    return {"token": token, "logprob": openai_logprob(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(sample: Row, decode: Decode) -> dict[str, Any]:
    content = []
    for position, (token_id, logprob) in enumerate(zip(sample["completion_token_ids"], sample["token_logprobs"])):
        entry = token_entry(token_id, logprob, decode)
        entry["top_logprobs"] = [token_entry(t, lp, decode) for t, lp in top_pairs(sample, position)]
        content.append(entry)
    return {"content": content}


def completion_logprobs(sample: Row, decode: Decode) -> dict[str, Any]:
    tokens = [decode(t) for t in sample["completion_token_ids"]]
    offsets: list[int] = []
    offset = 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    # Two alternatives that decode to the same text collapse into one key (as in OpenAI's format).
    top = [{decode(t): openai_logprob(lp) for t, lp in top_pairs(sample, i)} for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [openai_logprob(lp) for lp in sample["token_logprobs"]],
            "top_logprobs": top, "text_offset": offsets}


def top_pairs(sample: Row, position: int) -> list[tuple[int, float]]:
    ids = sample["top_token_ids"][position] if position < len(sample["top_token_ids"]) else []
    logprobs = sample["top_logprobs"][position] if position < len(sample["top_logprobs"]) else []
    return list(zip(ids, logprobs))
