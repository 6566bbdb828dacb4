"""The cache key: a hash of everything that determines a request's output.

Version 2 hashes, as canonical JSON: the key version; the teacher's identity (model, revision,
tokenizer hash, dtype); the mode; the exact prompt token ids after the chat template (so a
text prompt and the same tokens given as ids share one entry); the response token ids in
score mode; `top_logprobs`; and the normalised sampling parameters. Normalising removes what
cannot change the output (top_p/top_k/min_p/seed under greedy decoding, the order of stop
strings, top_k 0 versus -1 (both mean "off"), all sampling in score mode), so such
differences do not split the cache. The seed defaults to `DEFAULT_SEED`, so the same batch
submitted twice is one computation.

Parameters and the key version: version 2 names a default set, `V2_PARAMETERS` (the sampling
parameters there were when it was defined), which its keys hash whole. A parameter added to
`service.sampling.Sampling` since is hashed only when its value differs from its default
(under `"added"`), so a request that leaves it at its default keeps the key it had before the
parameter existed and still finds its cache entry. A new parameter's default must therefore
leave the output as it was; one that cannot (or a change of an existing parameter's meaning or
default) bumps `CACHE_KEY_VERSION` with a new default set: the version is hashed and is the
key's prefix, so old entries are never served for a changed meaning.

History: v1 lacked the model, so two unversioned teachers sharing a tokenizer (8B and 70B of
one family) could answer each other's requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from service.sampling import Sampling, defaults

CACHE_KEY_VERSION = 2
# The sampling parameters key version 2 was defined with: hashed whole, defaults included.
V2_PARAMETERS = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
})
SAMPLING_DEFAULTS: dict[str, Any] = defaults()
DEFAULT_SEED = SAMPLING_DEFAULTS["seed"]
GREEDY_IRRELEVANT = ("top_p", "top_k", "min_p", "seed")


def normalize_sampling(mode: str, sampling: dict[str, Any], definition: type[Sampling] = Sampling) -> dict[str, Any]:
    """Every parameter (defaults filled) with what cannot change the output dropped."""
    if mode == "score":
        return {}  # teacher-forced: nothing is sampled
    base = defaults(definition)
    full = {**base, **sampling}
    full["stop"] = sorted(set(full["stop"]))
    full["stop_token_ids"] = sorted(set(full["stop_token_ids"]))
    if full["top_k"] == 0:
        full["top_k"] = base["top_k"]  # vLLM reads 0 and -1 alike: no top-k cut
    if full["temperature"] == 0:
        for name in GREEDY_IRRELEVANT:
            full[name] = base[name]
    return full


def teacher_identity(model: str, revision: str, tokenizer_hash: str, dtype: str) -> dict[str, str]:
    """`model` names the weights (registry `model`, else the teacher's name): an operator's
    teachers often have no revision, and models of one family share a tokenizer."""
    return {"model": model, "revision": revision, "tokenizer_hash": tokenizer_hash, "dtype": dtype}


def hashed_sampling(sampling: dict[str, Any], definition: type[Sampling] = Sampling) -> dict[str, Any]:
    """What the key hashes of normalised sampling: the version's default set whole, and of the
    parameters added since, those that differ from their defaults."""
    if not sampling:
        return {}  # score mode
    base = defaults(definition)
    versioned = {name: value for name, value in sampling.items() if name in V2_PARAMETERS}
    added = {name: value for name, value in sampling.items()
             if name not in V2_PARAMETERS and value != base.get(name)}
    return {**versioned, "added": added} if added else versioned


def cache_key(
    teacher: dict[str, str],
    mode: str,
    prompt_token_ids: list[int],
    response_token_ids: list[int] | None,
    sampling: dict[str, Any],
    top_logprobs: int,
    definition: type[Sampling] = Sampling,
) -> str:
    """`sampling` must already be normalised (see `normalize_sampling`)."""
    return key_maker(teacher, mode, sampling, top_logprobs, definition)(prompt_token_ids, response_token_ids)


def canonical_document(teacher: dict[str, str], mode: str, prompt_token_ids: list[int],
                       response_token_ids: list[int] | None, sampling: dict[str, Any], top_logprobs: int,
                       definition: type[Sampling] = Sampling) -> str:
    """What the key hashes: the document as canonical JSON (sorted keys, no spaces)."""
    document = {
        "v": CACHE_KEY_VERSION,
        "teacher": teacher,
        "mode": mode,
        "prompt": prompt_token_ids,
        "response": response_token_ids,
        "sampling": hashed_sampling(sampling, definition),
        "top_logprobs": top_logprobs,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


class KeyOf(Protocol):
    """One job's cache key of a request's token lists (see key_maker)."""

    def __call__(self, prompt_token_ids: list[int], response_token_ids: list[int] | None,
                 joined_prompt: str | None = None) -> str: ...


def key_maker(teacher: dict[str, str], mode: str, sampling: dict[str, Any], top_logprobs: int,
              definition: type[Sampling] = Sampling) -> KeyOf:
    """cache_key for one job's parameters: `(prompt ids, response ids) -> key`. The canonical
    document is built around the token lists, everything else encoded once (json.dumps of the
    whole document was a hot spot of a 10^7-request submission); the bytes hashed are
    canonical_document's exactly (sorted keys: mode, prompt, response, sampling, teacher,
    top_logprobs, v), which tests check."""
    head = '{"mode":' + _canonical(mode) + ',"prompt":['
    tail = (',"sampling":' + _canonical(hashed_sampling(sampling, definition)) + ',"teacher":' + _canonical(teacher) + ',"top_logprobs":'
            + _canonical(top_logprobs) + ',"v":' + _canonical(CACHE_KEY_VERSION) + "}")
    prefix = f"k{CACHE_KEY_VERSION}-"

    def key(prompt_token_ids: list[int], response_token_ids: list[int] | None, joined_prompt: str | None = None) -> str:
        """`joined_prompt`: the prompt's ids already joined by commas, if the caller has them."""
        prompt = ",".join(map(str, prompt_token_ids)) if joined_prompt is None else joined_prompt
        response = "null" if response_token_ids is None else "[" + ",".join(map(str, response_token_ids)) + "]"
        canonical = head + prompt + '],"response":' + response + tail
        return prefix + hashlib.sha256(canonical.encode()).hexdigest()

    return key


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
