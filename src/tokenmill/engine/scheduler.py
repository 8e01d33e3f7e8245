"""Continuous batching: each step, fill a token budget with running decodes first, then prefill chunks.

- Running requests keep their place; each gets its next token (a decode) or its next prompt chunk.
- Waiting requests join, in (priority, arrival) order, while the budget, `max_num_seqs` and KV blocks allow;
  a long prompt is split into chunks so it never stalls running decodes (chunked prefill). The n completions of
  one prompt start one first; the others join once it has computed the prompt, and map its blocks.
- When blocks run out, the lowest-priority, latest running request is preempted: its blocks are freed
  and it recomputes later (its full blocks usually come back from the prefix cache).
- Priorities preempt (vLLM's priority policy): a waiting request more urgent than the least urgent running one
  takes that one's place when the seat limit (`max_num_seqs`) or the free blocks would keep it waiting.
- A decoding request with speculated tokens (request.draft_token_ids) gets them as one verify chunk, budget and
  blocks permitting (drafts are dropped before anyone is preempted for them); after the step, the KV of
  rejected drafts is rolled back: the computed count stops at the last accepted token and blocks past it are
  freed, so only final tokens are ever published to the prefix cache.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from tokenmill.cache.kv_cache_manager import KVCacheManager
from tokenmill.config import SchedulerConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.stats import SchedulerStats
from tokenmill.model.batch import BatchChunk, StepBatch


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens (drafts included)
    draft_token_ids: list[int] = field(default_factory=list)  # speculated tokens after the request's last one
    num_accepted: int = 0  # drafts that became part of the sequence (set after verification)

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so its logits give the next token (one row per draft more)."""
        return self.request.num_computed_tokens + self.num_tokens - len(self.draft_token_ids) == self.request.num_tokens

    def input_ids(self) -> list[int]:
        start = self.request.num_computed_tokens
        return self.request.token_ids[start:start + self.num_tokens - len(self.draft_token_ids)] + self.draft_token_ids


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes (1 token or verify) first, then prefills
    preempted: list[Request] = field(default_factory=list)
    batch: StepBatch = field(default_factory=lambda: StepBatch([]))  # the chunks as the runner reads them

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []  # sorted by sort_key
        self.num_preemptions = 0
        self.num_computed_tokens = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._preempt_for_priority(budget, out)
        for_priority = len(out.preempted)
        chunks: list[ScheduledChunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            drafts = request.draft_token_ids[:budget - 1] if remaining == 1 else []
            if drafts and not self._allocate_drafts(request, len(drafts), later=len(self.running) - i - 1):
                drafts = []  # speculation never preempts anyone
            n = min(remaining + len(drafts), budget)
            if not self._make_room(request, n, out):
                break  # `request` itself was the lowest-priority one and got preempted
            chunks.append(ScheduledChunk(request, n, drafts))
            budget -= n
            i += 1
        j = 0
        while (j < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.preempted) == for_priority):  # none preempted for blocks this step
            request = self.waiting[j]
            if out.preempted and request.priority >= out.preempted[-1].priority:
                break  # after preempting for priority, only the more urgent join (not the victims again)
            if self._sibling_prefilling(request):
                j += 1  # it will find the prompt in the prefix cache once its sibling has computed it
                continue
            request.num_computed_tokens = self.kv.lookup_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(request, n):
                self.kv.free(request)  # give back the prefix blocks it claimed; retry next step
                request.num_computed_tokens = 0
                break
            self._admit(j)
            chunks.append(ScheduledChunk(request, n))
            budget -= n
        out.chunks = sorted(chunks, key=lambda c: c.num_tokens != 1 and not c.draft_token_ids)  # decodes first
        out.batch = StepBatch([BatchChunk(c.input_ids(), c.request.num_computed_tokens,
                                          self.kv.block_tables[c.request.request_id], len(c.draft_token_ids),
                                          c.samples) for c in out.chunks])
        return out

    def _preempt_for_priority(self, budget: int, out: SchedulerOutput) -> None:
        """Preempt the least urgent running requests while the most urgent waiting one is more urgent and would not
        get a seat or its first chunk's blocks (counted without prefix hits: it may preempt one too many)."""
        while self.waiting and self.running and self.waiting[0].priority < self.running[-1].priority:
            head = self.waiting[0]
            blocks = self.kv.blocks_needed(min(head.num_tokens, budget)) * len(self.kv.windows)
            if len(self.running) < self.config.max_num_seqs and self.kv.pool.num_free >= blocks:
                return
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)

    def _allocate_drafts(self, request: Request, num_drafts: int, later: int) -> bool:
        """Blocks for the request's next token and its drafts, only if as many blocks stay free as the `later`
        running requests may need for their own next token (one per KV group each): a draft must never take the
        block a plain decode after it needs, or that request would be preempted for it."""
        if not self.kv.allocate(request, 1 + num_drafts):
            return False
        if self.kv.pool.num_free >= later * len(self.kv.windows):
            return True
        self.kv.trim(request)  # back to the blocks of its computed tokens; its decode allocates as usual
        return False

    def _sibling_prefilling(self, request: Request) -> bool:
        """One of n > 1 completions, never started, while a sibling still computes their shared prompt: it waits,
        so the prompt is computed once and the others map its blocks (vLLM's parallel sampling shares them too);
        only the last partial block is computed again, per sibling."""
        fanned_out = request.parent_id and request.parent_id != request.request_id
        if not (fanned_out and self.kv.enable_prefix_caching) or request.first_scheduled_time is not None:
            return False
        return any(r.parent_id == request.parent_id and r.num_computed_tokens < r.num_prompt_tokens
                   for r in self.running)

    def _admit(self, index: int) -> None:
        request = self.waiting.pop(index)
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=Request.sort_key)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_prompt_tokens = request.num_computed_tokens
            self.kv.record_prefix_query(request.num_tokens, request.num_computed_tokens)

    def _make_room(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for `request`, preempting from the tail of `running` until it fits."""
        while not self.kv.allocate(request, n):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request)

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: advance computed counts, publish full blocks, drop finished requests."""
        for chunk in out.chunks:
            request = chunk.request
            rejected = len(chunk.draft_token_ids) - chunk.num_accepted
            request.num_computed_tokens += chunk.num_tokens - rejected
            self.num_computed_tokens += chunk.num_tokens
            if rejected:
                self.kv.trim(request)
            self.kv.commit(request)
        for chunk in out.chunks:
            if chunk.request.finished:
                self.finish(chunk.request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def stats(self) -> SchedulerStats:
        used_blocks = self.kv.num_used_blocks()
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=used_blocks,
            kv_blocks_total=self.kv.pool.num_blocks,
            kv_utilization=self.kv.utilization(self.running),
            prefix_cache_queries=self.kv.prefix_stats.queries,
            prefix_cache_hits=self.kv.prefix_stats.hits,
            num_preemptions=self.num_preemptions,
            num_computed_tokens=self.num_computed_tokens,
        )
