"""The cache key on its own: everything that determines a request's output changes it, and
nothing else does (the end-to-end cache tests are in tests/integration/test_cache.py)."""

from __future__ import annotations

import pytest

from service import cachekey
from service.cachekey import CACHE_KEY_VERSION, cache_key, normalize_sampling, teacher_identity

IDENTITY = teacher_identity("m", "rev1", "sha256:tok", "float32")


def key(sampling: dict | None = None, mode: str = "generate", prompt=(1, 2, 3), response=None, top_logprobs=20,
        identity=IDENTITY) -> str:
    normal = normalize_sampling(mode, sampling or {})
    return cache_key(identity, mode, list(prompt), response, normal, top_logprobs)


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"max_tokens": 64}, {"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 50}, {"min_p": 0.1},
    {"n": 2}, {"stop": ["\n"]}, {"stop_token_ids": [2]}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
    {"repetition_penalty": 1.1}, {"ignore_eos": True},
])
def test_key_changes_with_every_sampling_parameter(change):
    assert key(change) != key()


@pytest.mark.parametrize("other", [
    {"prompt": (1, 2, 4)}, {"prompt": (1, 2)}, {"top_logprobs": 5}, {"mode": "score", "response": [4]},
    {"identity": teacher_identity("other-model", "rev1", "sha256:tok", "float32")},
    {"identity": teacher_identity("m", "rev2", "sha256:tok", "float32")},
    {"identity": teacher_identity("m", "rev1", "sha256:other", "float32")},
    {"identity": teacher_identity("m", "rev1", "sha256:tok", "bfloat16")},
])
def test_key_changes_with_teacher_mode_prompt_and_top_logprobs(other):
    assert key(**other) != key()


def test_score_key_changes_with_the_response_tokens():
    assert key(mode="score", response=[4, 5]) != key(mode="score", response=[4, 6])


@pytest.mark.parametrize("a, b", [
    ({}, dict(cachekey.SAMPLING_DEFAULTS)),  # defaults filled in, the seed included
    ({"stop": ["a", "b"]}, {"stop": ["b", "a", "a"]}),  # stop strings are a set
    ({"stop_token_ids": [3, 2]}, {"stop_token_ids": [2, 3]}),
    ({"top_k": 0}, {"top_k": -1}),  # both mean "no top-k cut"
    ({"temperature": 0}, {"temperature": 0, "top_p": 0.5, "top_k": 5, "min_p": 0.2, "seed": 9}),  # greedy
])
def test_parameters_that_cannot_change_the_output_share_a_key(a, b):
    assert key(a) == key(b)


def test_score_mode_ignores_sampling():
    assert key({"temperature": 0.3, "seed": 5}, mode="score", response=[4]) == key(mode="score", response=[4])


def test_key_is_versioned(monkeypatch):
    before = key()
    assert before.startswith(f"k{cachekey.CACHE_KEY_VERSION}-")
    monkeypatch.setattr(cachekey, "CACHE_KEY_VERSION", cachekey.CACHE_KEY_VERSION + 1)
    assert key() != before and key().startswith(f"k{cachekey.CACHE_KEY_VERSION}-")


def test_key_is_stable_across_processes():
    """Canonical JSON, not Python's hash(): a restarted service computes the same keys."""
    assert key() == key() and len(key().split("-", 1)[1]) == 64


@pytest.mark.parametrize("seed", range(20))
def test_the_key_hashes_the_canonical_document_exactly(seed):
    import hashlib
    import random

    from service.cachekey import canonical_document

    rng = random.Random(seed)
    teacher = {"model": rng.choice(["m", "modèle", "a\"b"]), "revision": "r", "tokenizer_hash": "t", "dtype": "bf16"}
    mode = rng.choice(["generate", "score"])
    sampling = normalize_sampling(mode, {"stop": [rng.choice(["\n", "stöp", "</s>"])], "temperature": rng.random(),
                                         "seed": rng.randrange(2**40)})
    prompt = [rng.randrange(2**31 - 1) for _ in range(rng.randrange(1, 50))]
    response = None if mode == "generate" else [rng.randrange(50_000) for _ in range(rng.randrange(1, 9))]
    top = rng.randrange(21)
    document = canonical_document(teacher, mode, prompt, response, sampling, top)
    expected = f"k{CACHE_KEY_VERSION}-" + hashlib.sha256(document.encode()).hexdigest()
    assert cache_key(teacher, mode, prompt, response, sampling, top) == expected


# The key function as it was before sampling parameters had one definition (commit 991b030):
# every key it made must still be made, so the entries stored under them are still found.
OLD_DEFAULTS = {"max_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "seed": 0, "n": 1,
                "stop": [], "stop_token_ids": [], "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "repetition_penalty": 1.0, "ignore_eos": False}


def old_key(sampling: dict, top_logprobs: int = 20, mode: str = "generate", prompt=(1, 2, 3),
            identity: dict = IDENTITY) -> str:
    import hashlib
    import json

    full = {} if mode == "score" else {**OLD_DEFAULTS, **sampling}
    if full:
        full["stop"], full["stop_token_ids"] = sorted(set(full["stop"])), sorted(set(full["stop_token_ids"]))
        full["top_k"] = -1 if full["top_k"] == 0 else full["top_k"]
        if full["temperature"] == 0:
            full.update({name: OLD_DEFAULTS[name] for name in ("top_p", "top_k", "min_p", "seed")})
    document = {"v": 2, "teacher": identity, "mode": mode, "prompt": list(prompt), "response": None,
                "sampling": full, "top_logprobs": top_logprobs}
    return "k2-" + hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SamplingWithANewParameter(cachekey.Sampling):
    """A parameter added after key version 2, whose default leaves outputs as they were."""

    logit_soft_cap: float = 0.0


SAMPLINGS_KEYED_BEFORE = [{}, {"seed": 7}, {"temperature": 0.7, "stop": ["b", "a"]}, {"temperature": 0.0, "seed": 9},
                          {"max_tokens": 16, "n": 2, "top_k": 0, "stop_token_ids": [5, 2]}]


@pytest.mark.parametrize("sampling", SAMPLINGS_KEYED_BEFORE)
def test_keys_made_before_one_definition_are_made_still(sampling):
    assert key(sampling, top_logprobs=5) == old_key(sampling, top_logprobs=5)


def test_a_stored_key_from_before_is_still_computed():
    # Computed by the service at commit 991b030 and kept: the default request's key.
    assert key() == "k2-484d1134b866a0bb18663450e596e3c4d6b2116ea4b7cf69a23cb05cd53fca69"


@pytest.mark.parametrize("sampling", SAMPLINGS_KEYED_BEFORE)
def test_adding_a_parameter_at_its_default_keeps_every_key(sampling):
    definition = SamplingWithANewParameter
    normal = cachekey.normalize_sampling("generate", definition(**sampling).values(), definition)
    assert "logit_soft_cap" in normal  # the engine is given it
    assert cache_key(IDENTITY, "generate", [1, 2, 3], None, normal, 20, definition) == old_key(sampling)


def test_a_new_parameter_off_its_default_splits_the_key():
    definition = SamplingWithANewParameter
    changed = cachekey.normalize_sampling("generate", definition(logit_soft_cap=30.0).values(), definition)
    assert cache_key(IDENTITY, "generate", [1, 2, 3], None, changed, 20, definition) != old_key({})
