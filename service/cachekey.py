"""The cache key: a hash of everything that determines a request's output.

Version 2 hashes, as canonical JSON: the key version; the teacher's identity (model, revision,
tokenizer hash, dtype); the mode; the exact prompt token ids after the chat template (so a
text prompt and the same tokens given as ids share one entry); the response token ids in
score mode; `top_logprobs`; and the normalised sampling parameters. Normalising removes what
cannot change the output (top_p/top_k/min_p/seed under greedy decoding, the order of stop
strings, top_k 0 versus -1 (both mean "off"), all sampling in score mode), so such
differences do not split the cache. The seed defaults to `DEFAULT_SEED`, so the same batch
submitted twice is one computation. Changing anything here must bump `CACHE_KEY_VERSION`: the
version is both hashed and the key's prefix, so old entries are never served.

History: v1 lacked the model, so two unversioned teachers sharing a tokenizer (8B and 70B of
one family) could answer each other's requests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

CACHE_KEY_VERSION = 2
DEFAULT_SEED = 0

SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_tokens": 128,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "seed": DEFAULT_SEED,
    "n": 1,
    "stop": [],
    "stop_token_ids": [],
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "ignore_eos": False,
}
GREEDY_IRRELEVANT = ("top_p", "top_k", "min_p", "seed")


def normalize_sampling(mode: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and drop what cannot change the output."""
    if mode == "score":
        return {}  # teacher-forced: nothing is sampled
    full = {**SAMPLING_DEFAULTS, **sampling}
    full["stop"] = sorted(set(full["stop"]))
    full["stop_token_ids"] = sorted(set(full["stop_token_ids"]))
    if full["top_k"] == 0:
        full["top_k"] = SAMPLING_DEFAULTS["top_k"]  # vLLM reads 0 and -1 alike: no top-k cut
    if full["temperature"] == 0:
        for name in GREEDY_IRRELEVANT:
            full[name] = SAMPLING_DEFAULTS[name]
    return full


def teacher_identity(model: str, revision: str, tokenizer_hash: str, dtype: str) -> dict[str, str]:
    """`model` names the weights (registry `model`, else the teacher's name): an operator's
    teachers often have no revision, and models of one family share a tokenizer."""
    return {"model": model, "revision": revision, "tokenizer_hash": tokenizer_hash, "dtype": dtype}


def cache_key(
    teacher: dict[str, str],
    mode: str,
    prompt_token_ids: list[int],
    response_token_ids: list[int] | None,
    sampling: dict[str, Any],
    top_logprobs: int,
) -> str:
    """`sampling` must already be normalised (see `normalize_sampling`)."""
    return key_maker(teacher, mode, sampling, top_logprobs)(prompt_token_ids, response_token_ids)


def canonical_document(teacher: dict[str, str], mode: str, prompt_token_ids: list[int],
                       response_token_ids: list[int] | None, sampling: dict[str, Any], top_logprobs: int) -> str:
    """What the key hashes: the document as canonical JSON (sorted keys, no spaces)."""
    document = {
        "v": CACHE_KEY_VERSION,
        "teacher": teacher,
        "mode": mode,
        "prompt": prompt_token_ids,
        "response": response_token_ids,
        "sampling": sampling,
        "top_logprobs": top_logprobs,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def key_maker(teacher: dict[str, str], mode: str, sampling: dict[str, Any],
              top_logprobs: int) -> Callable[[list[int], list[int] | None], str]:
    """cache_key for one job's parameters: `(prompt ids, response ids) -> key`. The canonical
    document is built around the token lists, everything else encoded once (json.dumps of the
    whole document was a hot spot of a 10^7-request submission); the bytes hashed are
    canonical_document's exactly (sorted keys: mode, prompt, response, sampling, teacher,
    top_logprobs, v), which tests check."""
    head = '{"mode":' + _canonical(mode) + ',"prompt":['
    tail = (',"sampling":' + _canonical(sampling) + ',"teacher":' + _canonical(teacher) + ',"top_logprobs":'
            + _canonical(top_logprobs) + ',"v":' + _canonical(CACHE_KEY_VERSION) + "}")
    prefix = f"k{CACHE_KEY_VERSION}-"

    def key(prompt_token_ids: list[int], response_token_ids: list[int] | None) -> str:
        response = "null" if response_token_ids is None else "[" + ",".join(map(str, response_token_ids)) + "]"
        canonical = head + ",".join(map(str, prompt_token_ids)) + '],"response":' + response + tail
        return prefix + hashlib.sha256(canonical.encode()).hexdigest()

    return key


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
