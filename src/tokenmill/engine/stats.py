"""What the engine reports of itself after each step (the scheduler fills it): the API process reads it for
/metrics and backpressure, so it imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecCounters:
    """One proposer's speculation counters, cumulative (a "mix" config has one per proposer it chooses from)."""

    method: str
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: tuple[int, ...]
    propose_seconds: float


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_utilization: float  # tokens stored / slots in allocated blocks
    prefix_cache_queries: int  # cumulative prompt tokens looked up
    prefix_cache_hits: int  # cumulative prompt tokens found cached
    num_preemptions: int  # cumulative
    num_computed_tokens: int  # cumulative tokens run through the model (prefill chunks + decodes)
    # speculative decoding, cumulative (spec_decode/metrics.py); per_pos is empty when it is not configured
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()
    spec_method: str = ""  # the proposer: ngram, suffix, draft_model or mix
    spec_propose_seconds: float = 0.0  # cumulative time spent proposing drafts
    spec_by_method: tuple[SpecCounters, ...] = ()  # the same, per proposer
