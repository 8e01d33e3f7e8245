"""Exact verification of proposed tokens (Leviathan et al. 2023; Chen et al. 2023).

Draft token i, drawn from q_i, is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection
a token is drawn from norm(max(0, p_i - q_i)) instead and the rest is dropped; when all are accepted, a bonus
token is drawn from p_d. Every emitted token is then distributed exactly as p, whatever q was. A
deterministic proposer has q one-hot on its token: accept with probability p(x), else draw from p without x.
Greedy requests need no randomness: drafts are accepted while they equal the target's argmax.
"""
from __future__ import annotations

import torch


def greedy_verify(target_argmax: list[int], draft_ids: list[int]) -> list[int]:
    """Tokens to emit: the longest prefix of the draft agreeing with the target, then the target's next token.
    target_argmax has len(draft_ids) + 1 entries (row i predicts the token after draft token i - 1)."""
    accepted = 0
    while accepted < len(draft_ids) and draft_ids[accepted] == target_argmax[accepted]:
        accepted += 1
    return draft_ids[:accepted] + [target_argmax[accepted]]


def rejection_sample(target_probs: torch.Tensor, draft_ids: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """Tokens to emit: the accepted drafts, then one token recovered at the rejection or the bonus token.

    target_probs: [d + 1, vocab] (rows are p given the context and draft tokens before them);
    draft_probs: [d, vocab] the q each draft token was drawn from, or None for one-hot q."""
    for i, token in enumerate(draft_ids):
        p = target_probs[i]
        q = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if float(torch.rand((), generator=generator)) * q < float(p[token]):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0  # max(0, p - onehot(token)) is p without the token
        else:
            residual = (p - draft_probs[i]).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:  # only from rounding (p <= q everywhere means p == q): fall back to p
            residual = p
        return draft_ids[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(draft_ids) + [int(torch.multinomial(target_probs[len(draft_ids)], 1, generator=generator))]
