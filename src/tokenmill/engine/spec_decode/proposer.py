"""The proposer interface: given running requests and how many tokens each may get, guess their next tokens."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tokenmill.engine.request import Request


@dataclass
class Draft:
    """Proposed tokens for one request. `probs[i]` is the distribution token_ids[i] was drawn from (q of the
    rejection sampler); None when the proposer is deterministic (q is one-hot on the proposed token)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab] float32


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        """One Draft per request, of at most num_tokens[i] tokens (0 allowed), continuing request.token_ids."""
        ...

    def learn(self, finished: Sequence[Request]) -> None:
        """Requests that finished (stop or length): what a proposer that learns from outputs keeps of them."""
        ...

    def retain(self, request_ids: set[str]) -> None:
        """Drop any per-request state (e.g. draft KV blocks) of requests not in `request_ids`."""
        ...
