"""Goodness-of-fit helpers for tests of sampled soft labels (no scipy: torch's gammaincc)."""

from __future__ import annotations

from collections import Counter

import torch


def chi_square_p(observed: Counter[int], probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi-square test of `observed` token counts against the distribution `probs`
    (float64, sums to 1): tokens whose expected count is at least `min_expected` are bins of
    their own, all others pooled into one bin. Returns (p-value, degrees of freedom)."""
    total = sum(observed.values())
    expected = probs.double() * total
    own = torch.nonzero(expected >= min_expected).flatten().tolist()
    own_set = set(own)
    obs = [float(observed.get(t, 0)) for t in own]
    exp = [expected[t].item() for t in own]
    rest_obs = float(sum(c for t, c in observed.items() if t not in own_set))
    rest_exp = total - sum(exp)
    if rest_exp >= min_expected:
        obs.append(rest_obs)
        exp.append(rest_exp)
    elif rest_obs > 0:
        # Draws where the distribution has (almost) no mass: a bin with its tiny expectation.
        obs.append(rest_obs)
        exp.append(max(rest_exp, 1e-12))
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    statistic = ((o - e) ** 2 / e).sum()
    df = len(obs) - 1
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()
    return p, df
