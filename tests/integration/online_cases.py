"""The request bodies the online endpoints are compared on against a real `vllm serve` of the
default teacher (tests/integration/test_online_vllm.py): every teacher-scoring form on-policy
trainers send, ordinary generation with logprobs, chat, and a handful of bodies vLLM refuses."""

from __future__ import annotations

from typing import Any

TEXT = "The capital of France is Paris. The capital of Italy is"
OTHER = "def add(a, b):\n    return"
MESSAGES = [{"role": "user", "content": "Name a primary colour."}]
STOP_TOKEN = 278  # " b" in the teacher's vocabulary: its greedy continuation of OTHER is " a + b\n"


def ok_cases(ids: list[int], other_ids: list[int], model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (path, body) for the forms that succeed."""
    score = {"model": model, "max_tokens": 0, "temperature": 0, "echo": True}
    return {
        "echo_ids": ("/completions", {**score, "prompt": ids, "logprobs": 5}),
        "echo_text": ("/completions", {**score, "prompt": TEXT, "logprobs": 5}),
        "echo_batch_ids": ("/completions", {**score, "prompt": [ids, other_ids, ids[:3]], "logprobs": 3}),
        "echo_batch_text": ("/completions", {**score, "prompt": [TEXT, OTHER], "logprobs": 2}),
        "echo_k0": ("/completions", {**score, "prompt": other_ids, "logprobs": 0}),
        "prompt_logprobs_1": ("/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                                               "prompt_logprobs": 4}),
        "echo_1": ("/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
                                    "logprobs": 4}),
        "generate_logprobs": ("/completions", {"model": model, "prompt": TEXT, "max_tokens": 8, "temperature": 0,
                                               "logprobs": 3}),
        "generate_batch": ("/completions", {"model": model, "prompt": [TEXT, OTHER], "max_tokens": 6,
                                            "temperature": 0, "logprobs": 2}),
        "generate_plain": ("/completions", {"model": model, "prompt": other_ids, "max_tokens": 5, "temperature": 0}),
        # Greedy, the teacher goes on " Rome. The capital of Spain is Madrid." and " a + b\n":
        # a stop string inside a token, and a stop token (vLLM's stop_reason, and its text).
        "generate_stop_string": ("/completions", {"model": model, "prompt": TEXT, "max_tokens": 8, "temperature": 0,
                                                  "logprobs": 2, "stop": ["Spain", "Berlin"]}),
        "generate_stop_token": ("/completions", {"model": model, "prompt": other_ids, "max_tokens": 8,
                                                 "temperature": 0, "logprobs": 1, "stop_token_ids": [STOP_TOKEN]}),
        "chat_stop_string": ("/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 8,
                                                   "temperature": 0, "stop": [" "]}),
        "chat_logprobs": ("/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 8,
                                                "temperature": 0, "logprobs": True, "top_logprobs": 3}),
        "chat_plain": ("/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 6,
                                             "temperature": 0}),
        # A trainer scoring a chat transcript: the rendered prompt's logprobs, top-level.
        "chat_prompt_logprobs": ("/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 1,
                                                       "temperature": 0, "prompt_logprobs": 5}),
    }


def bad_cases(ids: list[int], model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (path, body) for bodies vLLM refuses."""
    score = {"model": model, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 2}
    return {
        "unknown_model": ("/completions", {**score, "model": "no-such-model", "prompt": ids}),
        "logprobs_above_max": ("/completions", {**score, "prompt": ids, "logprobs": 50}),
        "prompt_too_long": ("/completions", {**score, "prompt": (ids * 400)[:2100]}),
        "empty_prompt_text": ("/completions", {**score, "prompt": ""}),
        "empty_prompt_ids": ("/completions", {**score, "prompt": []}),
        "non_integer_ids": ("/completions", {**score, "prompt": [ids[0], 1.5, ids[1]]}),
        "string_in_ids": ("/completions", {**score, "prompt": [ids[0], "x"]}),
    }
