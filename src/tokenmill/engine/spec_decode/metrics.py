"""Speculation counters, cumulative, as vLLM exports them (spec_decode_num_drafts, ..._per_pos)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verified proposals (a request with >= 1 proposed token, in one step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted
    propose_seconds: float = 0.0  # time the proposer took, all steps

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        if not num_draft_tokens:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @classmethod
    def merged(cls, parts: list[SpecDecodeStats]) -> SpecDecodeStats:
        """The counters of several proposers together."""
        return cls(sum(p.num_drafts for p in parts), sum(p.num_draft_tokens for p in parts),
                   sum(p.num_accepted_tokens for p in parts),
                   [sum(counts) for counts in zip(*(p.accepted_per_pos for p in parts))],
                   sum(p.propose_seconds for p in parts))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified draft: accepted ones plus the target's own (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
