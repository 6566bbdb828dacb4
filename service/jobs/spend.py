"""Spend accounting: the tokens a job sent to its teacher, those the cache answered instead,
and what they cost or saved where the registry gives the teacher's prices.

Kept on the job row as its requests are answered (service/jobs/repository.py, with_counters):
each answered request points at a result, which records its prompt and completion tokens, and
the job adds each distinct result once, as sent or as answered from the cache.
In score mode the teacher reads prompt + response as its prompt and generates nothing that is
kept, so the response tokens count as prompt tokens there.
"""

from __future__ import annotations

from service.jobs.schemas import Spend

Prices = tuple[float | None, float | None]  # USD per million prompt / completion tokens
NO_PRICES: Prices = (None, None)
SpendTokens = dict[bool, tuple[int, int]]  # {answered from the cache?: (prompt, completion) tokens}


def teacher_tokens(mode: str, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
    """(prompt, completion) tokens as the teacher sees them, from a result's recorded counts."""
    if mode == "score":
        return prompt_tokens + completion_tokens, 0
    return prompt_tokens, completion_tokens


def cost_usd(prompt_tokens: int, completion_tokens: int, prices: Prices) -> float | None:
    if prices == NO_PRICES:
        return None
    prompt_price, completion_price = (price or 0.0 for price in prices)
    return (prompt_tokens * prompt_price + completion_tokens * completion_price) / 1_000_000


def job_spend(mode: str, tokens: SpendTokens, prices: Prices) -> Spend:
    """`tokens`: {answered from the cache?: (prompt, completion) tokens of the results}."""
    sent = teacher_tokens(mode, *tokens.get(False, (0, 0)))
    cached = teacher_tokens(mode, *tokens.get(True, (0, 0)))
    return Spend(prompt_tokens_sent=sent[0], completion_tokens_sent=sent[1], cached_prompt_tokens=cached[0],
                 cached_completion_tokens=cached[1], spent_usd=cost_usd(*sent, prices),
                 saved_usd=cost_usd(*cached, prices))
