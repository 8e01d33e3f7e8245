"""What the engine step calls: propose before scheduling, verify after the target's forward, learn from both."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import ScheduledChunk
from tokenmill.engine.spec_decode.adaptive import AdaptiveController
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.draft_model import DraftModelProposer
from tokenmill.engine.spec_decode.metrics import SpecDecodeStats
from tokenmill.engine.spec_decode.ngram import NgramProposer
from tokenmill.engine.spec_decode.proposer import Draft, Proposer
from tokenmill.engine.spec_decode.rejection import greedy_verify, rejection_sample
from tokenmill.engine.spec_decode.suffix import SuffixProposer
from tokenmill.model.llama import LlamaModel
from tokenmill.model.sampler import (
    SampledToken,
    StepLogits,
    changes_logits,
    process_logits,
)


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposers: dict[str, Proposer]) -> None:
        """proposers: method name -> proposer; with several ("mix"), each request is drafted by the one whose drafts
        it has accepted best (the controller's estimate, from that proposer's recent acceptance over all requests
        until the request has its own), the next best where the first has nothing to propose."""
        self.config = config
        self.proposers = proposers
        self.controller = AdaptiveController(config.num_speculative_tokens, config.mode)
        self.method_stats = {m: SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
                             for m in proposers}
        self.drafts: dict[str, tuple[str, Draft]] = {}  # request -> (method, its draft) of this step

    @property
    def stats(self) -> SpecDecodeStats:
        """All proposers' counters together."""
        return SpecDecodeStats.merged(list(self.method_stats.values()))

    def propose(self, running: Sequence[Request]) -> None:
        """Set draft_token_ids of the running requests about to decode (others get none); the scheduler
        schedules each draft after the request's last token, as one verify chunk."""
        for request in running:
            request.draft_token_ids = []
        self.drafts.clear()
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        # proposers in the order each request trusts them most
        ranked = [sorted(self.proposers, key=lambda m, r=r: -self._alpha(r, m)) for r in decoding]
        # the target's token after the drafts counts toward max_tokens too, so positions never pass the limit
        limits = [r.max_tokens - (r.num_tokens - r.num_prompt_tokens) - 1 for r in decoding]
        plan = self.controller.plan([r.request_id for r in decoding], limits, [self._key(m[0]) for m in ranked])
        pending = [(r, k, methods) for r, k, methods in zip(decoding, plan, ranked) if k > 0]
        while pending:  # by each request's next proposer, until it drafts something or none is left
            for method in self.proposers:
                group = [(r, k) for r, k, methods in pending if methods[0] == method]
                if group:
                    for (request, _), draft in zip(group, self._propose(method, group)):
                        self._set(request, method, draft)
            pending = [(r, k, methods[1:]) for r, k, methods in pending
                       if r.request_id not in self.drafts and len(methods) > 1]

    def _alpha(self, request: Request, method: str) -> float:
        return self.controller.alpha(request.request_id, self._key(method))

    def _key(self, method: str) -> str:
        """The controller's name for a proposer: "" when there is one (its estimates are the request's own)."""
        return method if len(self.proposers) > 1 else ""

    def _propose(self, method: str, group: list[tuple[Request, int]]) -> list[Draft]:
        started = time.perf_counter()
        drafts = self.proposers[method].propose([r for r, _ in group], [k for _, k in group])
        seconds = time.perf_counter() - started
        self.method_stats[method].propose_seconds += seconds
        self.controller.observe_proposal(sum(len(d.token_ids) for d in drafts), seconds)
        return drafts

    def _set(self, request: Request, method: str, draft: Draft) -> None:
        if request.grammar is not None:  # only what the grammar allows is worth verifying
            keep = request.grammar.valid_prefix(draft.token_ids)
            draft = Draft(draft.token_ids[:keep], None if draft.probs is None else draft.probs[:keep])
        if draft.token_ids:
            request.draft_token_ids = draft.token_ids
            self.drafts[request.request_id] = (method, draft)

    def verify(self, request: Request, draft_ids: list[int], step: StepLogits, first_row: int) -> list[SampledToken]:
        """The tokens to append: accepted drafts, then the target's own. The step's rows first_row + i, for
        i <= len(draft_ids), were computed after draft token i - 1 (the scheduler may have cut the draft short)."""
        rows = slice(first_row, first_row + len(draft_ids) + 1)
        method, draft = self.drafts[request.request_id]
        params, output = request.params, request.output_ids
        grammar = request.grammar
        if params.greedy and grammar is None and not changes_logits(params, request.rules):  # the step's argmax
            tokens = greedy_verify(step.argmax[rows], draft_ids)
        else:
            masks = grammar.masks_along(draft_ids) if grammar is not None else [None] * (len(draft_ids) + 1)
            processed = torch.stack([process_logits(row, params, request.prompt_token_ids, output + draft_ids[:i],
                                                    request.rules, masks[i])
                                     for i, row in enumerate(step.logits[rows])])
            if params.greedy:
                tokens = greedy_verify(processed.argmax(-1).tolist(), draft_ids)
            else:
                q = draft.probs[:len(draft_ids)] if draft.probs is not None else None
                tokens = rejection_sample(processed.softmax(-1), draft_ids, q, request.generator)
        self.method_stats[method].observe(len(draft_ids), len(tokens) - 1)
        self.controller.observe_acceptance(request.request_id, len(draft_ids), len(tokens) - 1, self._key(method))
        return [step.sampled(first_row + i, token, params.logprobs) for i, token in enumerate(tokens)]

    def observe_step(self, chunks: Sequence[ScheduledChunk], seconds: float) -> None:
        """Time of a step (schedule, forward, sampling, bookkeeping; not proposing) for the cost model; only steps of
        decode and verify chunks: a prefill chunk runs other kernels (compute-bound GEMMs, attention over the
        chunk), and one long prompt's step would otherwise set the cost of a draft token for the next 20 steps."""
        if any(c.num_tokens - len(c.draft_token_ids) != 1 for c in chunks):
            return
        verify_chunks = sum(bool(c.draft_token_ids) for c in chunks)
        self.controller.observe_step(sum(c.num_tokens for c in chunks), verify_chunks, seconds)

    def learn(self, finished: Sequence[Request]) -> None:
        """Requests that finished this step (their outputs are what a suffix proposer matches later ones against)."""
        for proposer in self.proposers.values():
            proposer.learn(finished)

    def retain(self, request_ids: set[str]) -> None:
        for proposer in self.proposers.values():
            proposer.retain(request_ids)
        self.controller.retain(request_ids)


def make_speculator(config: SpeculativeConfig, draft_model: LlamaModel | None, draft_dtype: torch.dtype,
                    block_size: int, num_blocks: int, max_num_seqs: int) -> Speculator:
    """num_blocks: the target's pool; the draft's holds as many tokens plus every sequence's draft tail (KV
    memory is only backed once written, so the headroom costs nothing unused)."""
    if config.method != "draft_model":
        proposers = {"ngram": lambda: NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max),
                     "suffix": lambda: SuffixProposer(config.suffix_decoding_max_tree_depth,
                                                      config.suffix_decoding_max_cached_requests,
                                                      config.suffix_decoding_max_spec_factor,
                                                      config.suffix_decoding_min_token_prob)}
        return Speculator(config, {method: proposers[method]() for method in config.proposer_methods})
    if draft_model is None:
        raise ValueError("speculative_config.method 'draft_model' needs a draft model (see load_draft_model)")
    extra = max_num_seqs * (-(-config.num_speculative_tokens // block_size) + 1)
    return Speculator(config, {"draft_model": DraftModelProposer(draft_model, draft_dtype, block_size,
                                                                 num_blocks + extra)})
