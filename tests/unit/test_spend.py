"""Spend accounting on its own: what a job sent to its teacher, what the cache answered, what
each cost or saved at the registry's prices, and the form a finished job keeps."""

from __future__ import annotations

import pytest

from service.jobs.spend import NO_PRICES, cost_usd, job_spend, teacher_tokens


def test_score_mode_counts_the_response_as_prompt_tokens():
    assert teacher_tokens("score", 10, 5) == (15, 0)
    assert teacher_tokens("generate", 10, 5) == (10, 5)


def test_cost_is_per_million_tokens_and_unknown_without_prices():
    assert cost_usd(2_000_000, 1_000_000, (0.5, 2.0)) == pytest.approx(3.0)
    assert cost_usd(2_000_000, 1_000_000, (None, 2.0)) == pytest.approx(2.0)  # a free prompt side
    assert cost_usd(1, 1, NO_PRICES) is None


def test_a_job_s_spend_separates_sent_from_cached():
    spend = job_spend("generate", {False: (100, 40), True: (30, 10)}, (1.0, 3.0))
    assert (spend.prompt_tokens_sent, spend.completion_tokens_sent) == (100, 40)
    assert (spend.cached_prompt_tokens, spend.cached_completion_tokens) == (30, 10)
    assert spend.spent_usd == pytest.approx((100 + 120) / 1e6) and spend.saved_usd == pytest.approx((30 + 30) / 1e6)


def test_a_job_nothing_answered_yet_has_spent_nothing():
    spend = job_spend("score", {}, NO_PRICES)
    assert spend.prompt_tokens_sent == spend.cached_prompt_tokens == 0 and spend.spent_usd is None
