"""vLLM's response shapes (vllm 0.32's OpenAI server, `vllm serve`), from the rows of a plan's jobs.

Per prompt position, vLLM's logprob dict holds the actual (or sampled) token first, with its rank
in the whole vocabulary, then the top-k in rank order without repeating it; prompt logprobs key it
by token id (`{"id": {"logprob", "rank", "decoded_token"}}`, `null` at position 0), the completion
`logprobs` by decoded text (so two ids that decode alike are one entry), keeping the first k + 1.
Logprobs below -9999 are clamped to -9999, as vLLM clamps them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic_core import to_json

from service.online.service import Answer, Plan
from service.teachers.tokenizer import Teacher

JSON = "application/json"
FLOOR = -9999.0
FINGERPRINT = "teachercache"


def json_bytes(payload: dict[str, Any]) -> bytes:
    """pydantic-core's serializer (Rust; vLLM's server serializes with it too): a scored batch of
    64 x 256 positions at top-20 is 330,000 small objects, which json.dumps takes seconds over."""
    return to_json(payload)


def clamp(value: float) -> float:
    return max(value, FLOOR)


def position_entries(token: int, logprob: float, rank: int | None, top_ids: list[int],
                     top_logprobs: list[float]) -> list[tuple[int, float, int | None]]:
    """(id, logprob, rank) of one position in vLLM's order: the token, then the top-k not it. A
    token that is in the top-k takes the rank of its place there (vLLM's dict does the same)."""
    entries: dict[int, tuple[float, int | None]] = {token: (logprob, rank)}
    for place, (tid, lp) in enumerate(zip(top_ids, top_logprobs), start=1):
        entries[tid] = (lp, place)
    return [(tid, lp, r) for tid, (lp, r) in entries.items()]


def score_positions(ids: list[int], row: dict[str, Any] | None) -> list[list[tuple[int, float, int | None]] | None]:
    """A prompt's positions: None for the first, then each scored position's entries."""
    positions: list[list[tuple[int, float, int | None]] | None] = [None]
    if row is None:
        return positions
    ranks = row.get("token_ranks") or [None] * len(ids)
    for j, token in enumerate(ids[1:]):
        positions.append(position_entries(token, row["token_logprobs"][j], ranks[j], row["top_token_ids"][j],
                                          row["top_logprobs"][j]))
    return positions


def sample_positions(sample: dict[str, Any]) -> list[list[tuple[int, float, int | None]] | None]:
    ranks = sample.get("token_ranks") or [None] * len(sample["completion_token_ids"])
    return [position_entries(token, sample["token_logprobs"][i], ranks[i], sample["top_token_ids"][i],
                             sample["top_logprobs"][i])
            for i, token in enumerate(sample["completion_token_ids"])]


def prompt_logprobs_json(teacher: Teacher,
                         positions: list[list[tuple[int, float, int | None]] | None]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    context: list[int] = []  # the prompt's tokens so far (each position's first entry), as vLLM keeps them
    for entries in positions:
        if entries is None:
            out.append(None)
            continue
        out.append({str(tid): {"logprob": clamp(lp), "rank": rank,
                               "decoded_token": decoded_token(teacher, tid, context[-UTF8_CONTEXT:])}
                    for tid, lp, rank in entries})
        context.append(entries[0][0])
    return out


UTF8_CONTEXT = 4  # tokens: enough for any UTF-8 sequence split by byte-fallback tokens


def decoded_token(teacher: Teacher, tid: int, context: list[int]) -> str:
    """A token's text as vLLM's logprobs give it (vllm/v1/engine/logprobs.py, _correct_decoded_token):
    a token that decodes to an unfinished UTF-8 sequence (ending in U+FFFD) is decoded after the
    fewest preceding tokens that finish it, less their own text; '' if none does."""
    text = teacher.decode_token(tid)
    if not text.endswith("\ufffd"):
        return text
    for size in range(1, len(context) + 1):
        before = context[-size:]
        full = teacher.decode([*before, tid])
        if full.endswith("\ufffd"):
            continue
        clean_end = len(before)  # context tokens that are themselves unfinished belong to this one
        while clean_end > 0 and teacher.decode_token(before[clean_end - 1]).endswith("\ufffd"):
            clean_end -= 1
        prefix = teacher.decode(before[:clean_end]) if clean_end else ""
        if full.startswith(prefix):
            return full[len(prefix):]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""


def completion_logprobs(teacher: Teacher, token_ids: list[int],
                        positions: list[list[tuple[int, float, int | None]] | None], k: int) -> dict[str, Any]:
    tokens = [teacher.decode_token(t) for t in token_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for entries in positions:
        if entries is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(clamp(entries[0][1]))
        top.append({teacher.decode_token(tid): clamp(lp) for i, (tid, lp, _) in enumerate(entries) if k >= i})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}


def stop_reason(sample: dict[str, Any] | None) -> str | int | None:
    """vLLM's `stop_reason`: the stop string or stop token id that ended the sample; null for the
    end-of-sequence token, the length, and rows stored before the columns existed."""
    if sample is None:
        return None
    if sample.get("stop_string") is not None:
        return str(sample["stop_string"])
    return None if sample.get("stop_token_id") is None else int(sample["stop_token_id"])


def sample_text(teacher: Teacher, sample: dict[str, Any]) -> str:
    """The sample's text as `vllm serve` answers it: the stored text is every token decoded (the
    stop string included, workers/vllm_adapter.py); vLLM's ends before the stop string, or
    before the stop token (whose logprobs it still reports)."""
    reason = stop_reason(sample)
    if isinstance(reason, str):
        text = str(sample["completion_text"])
        end = text.find(reason)
        return text if end < 0 else text[:end]
    if isinstance(reason, int):
        return teacher.decode_text(list(sample["completion_token_ids"])[:-1])
    return str(sample["completion_text"])


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def render_completion(plan: Plan, answer: Answer, model: str) -> dict[str, Any]:
    teacher = plan.teacher
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    n = plan.generate.n if plan.generate is not None else 1
    scores, all_samples = answer.scores(plan), answer.samples(plan)
    for index, ids in enumerate(plan.prompts):
        scored = score_positions(ids, scores[index]) if plan.score_k is not None else None
        given = plan.texts[index]
        prompt_text = given if given is not None else teacher.decode(ids)
        # echo with max_tokens 0: vLLM runs (and counts) one token it does not show.
        samples: list[dict[str, Any] | None] = list(all_samples[index]) if plan.generate is not None else [None] * n
        for sample in samples:
            out_ids = [] if sample is None else list(sample["completion_token_ids"])
            completion_tokens += 1 if sample is None else len(out_ids)
            out_positions = [] if sample is None else sample_positions(sample)
            out_text = "" if sample is None else sample_text(teacher, sample)
            if plan.echo:
                token_ids, text = ids + out_ids, prompt_text + out_text
                positions = None if scored is None else scored + out_positions
            else:
                token_ids, text, positions = out_ids, out_text, out_positions
            logprobs = None
            if plan.generate_k is not None and positions is not None:
                logprobs = completion_logprobs(teacher, token_ids, positions, plan.generate_k)
            choices.append({
                "index": len(choices), "text": text, "logprobs": logprobs,
                "finish_reason": "length" if sample is None else sample["finish_reason"],
                "stop_reason": stop_reason(sample),
                "token_ids": None,
                "prompt_logprobs": None if scored is None else prompt_logprobs_json(teacher, scored),
                "prompt_token_ids": None, "routed_experts": None,
            })
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
        "model": model, "choices": choices, "service_tier": None, "system_fingerprint": FINGERPRINT,
        "usage": usage(sum(len(ids) for ids in plan.prompts), completion_tokens),
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def chat_token(teacher: Teacher, tid: int, logprob: float) -> dict[str, Any]:
    token = teacher.decode_token(tid)
    return {"token": token, "logprob": clamp(logprob), "bytes": list(token.encode())}


def chat_logprobs(teacher: Teacher, sample: dict[str, Any], k: int) -> dict[str, Any]:
    content = []
    for i, tid in enumerate(sample["completion_token_ids"]):
        entry = chat_token(teacher, tid, sample["token_logprobs"][i])
        entry["top_logprobs"] = [chat_token(teacher, t, lp) for t, lp in
                                 zip(sample["top_token_ids"][i][:k], sample["top_logprobs"][i][:k])]
        content.append(entry)
    return {"content": content}


def render_chat(plan: Plan, answer: Answer, model: str) -> dict[str, Any]:
    teacher = plan.teacher
    choices: list[dict[str, Any]] = []
    samples = answer.samples(plan)[0]
    for sample in samples:
        message = {"role": "assistant", "content": sample_text(teacher, sample), "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "reasoning": None}
        choices.append({
            "index": len(choices), "message": message,
            "logprobs": None if plan.generate_k is None else chat_logprobs(teacher, sample, plan.generate_k),
            "finish_reason": sample["finish_reason"], "stop_reason": stop_reason(sample), "token_ids": None,
            "routed_experts": None,
        })
    completion_tokens = sum(len(s["completion_token_ids"]) for s in samples)
    scored = score_positions(plan.prompts[0], answer.scores(plan)[0]) if plan.score_k is not None else None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices, "service_tier": None, "system_fingerprint": FINGERPRINT,
        "usage": usage(len(plan.prompts[0]), completion_tokens),
        "prompt_logprobs": None if scored is None else prompt_logprobs_json(teacher, scored),
        "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None,
        "metrics": None,
    }


def models_list(teachers: list[Teacher]) -> dict[str, Any]:
    """GET /v1/models: the teachers, as vLLM lists its served model."""
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": t.name, "object": "model", "created": created, "owned_by": "teachercache",
         "root": t.spec.model or t.name, "parent": None, "max_model_len": t.spec.max_model_len,
         "permission": [{"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                         "created": created, "allow_create_engine": False, "allow_sampling": True,
                         "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                         "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}]}
        for t in teachers]}
