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
