"""transformers as an independent oracle for the teacher's logprobs."""

from __future__ import annotations

import torch


def forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax at each completion position: row t is the distribution that predicted completion[t]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(completion)]


def assert_row_matches(model, row: dict, tolerance: float = 1e-3, tie: float = 1e-5) -> float:
    """Every stored logprob and top-k agrees with a transformers forward pass; returns the max |diff|."""
    expected = forward_logprobs(model, row["prompt_token_ids"], row["completion_token_ids"])
    worst = 0.0
    for t, token in enumerate(row["completion_token_ids"]):
        worst = max(worst, abs(row["token_logprobs"][t] - expected[t, token].item()))
        k = len(row["top_token_ids"][t])
        ref_values, ref_ids = torch.topk(expected[t], k)
        for got_id, got_lp, ref_id, ref_lp in zip(row["top_token_ids"][t], row["top_logprobs"][t], ref_ids.tolist(), ref_values.tolist()):
            worst = max(worst, abs(got_lp - ref_lp), abs(got_lp - expected[t, got_id].item()))
            if got_id != ref_id:  # allowed only for an exact tie
                assert abs(expected[t, got_id].item() - ref_lp) <= tie, (t, got_id, ref_id)
        assert row["top_logprobs"][t] == sorted(row["top_logprobs"][t], reverse=True)
    assert worst <= tolerance, worst
    return worst
