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
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.controller = AdaptiveController(config.num_speculative_tokens, config.mode)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.drafts: dict[str, Draft] = {}

    def propose(self, running: Sequence[Request]) -> None:
        """Set draft_token_ids of the running requests about to decode (others get none); the scheduler
        schedules each draft after the request's last token, as one verify chunk."""
        for request in running:
            request.draft_token_ids = []
        self.drafts.clear()
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        # the target's token after the drafts counts toward max_tokens too, so positions never pass the limit
        limits = [r.max_tokens - (r.num_tokens - r.num_prompt_tokens) - 1 for r in decoding]
        plan = self.controller.plan([r.request_id for r in decoding], limits)
        chosen = [(r, k) for r, k in zip(decoding, plan) if k > 0]
        if not chosen:
            return
        started = time.perf_counter()
        drafts = self.proposer.propose([r for r, _ in chosen], [k for _, k in chosen])
        seconds = time.perf_counter() - started
        self.stats.propose_seconds += seconds
        self.controller.observe_proposal(sum(len(d.token_ids) for d in drafts), seconds)
        for (request, _), draft in zip(chosen, drafts):
            if request.grammar is not None:  # only what the grammar allows is worth verifying
                keep = request.grammar.valid_prefix(draft.token_ids)
                draft = Draft(draft.token_ids[:keep], None if draft.probs is None else draft.probs[:keep])
            request.draft_token_ids = draft.token_ids
            self.drafts[request.request_id] = draft

    def verify(self, request: Request, draft_ids: list[int], step: StepLogits, first_row: int) -> list[SampledToken]:
        """The tokens to append: accepted drafts, then the target's own. The step's rows first_row + i, for
        i <= len(draft_ids), were computed after draft token i - 1 (the scheduler may have cut the draft short)."""
        rows = slice(first_row, first_row + len(draft_ids) + 1)
        draft = self.drafts[request.request_id]
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
        self.stats.observe(len(draft_ids), len(tokens) - 1)
        self.controller.observe_acceptance(request.request_id, len(draft_ids), len(tokens) - 1)
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
        self.proposer.learn(finished)

    def retain(self, request_ids: set[str]) -> None:
        self.proposer.retain(request_ids)
        self.controller.retain(request_ids)


def make_speculator(config: SpeculativeConfig, draft_model: LlamaModel | None, draft_dtype: torch.dtype,
                    block_size: int, num_blocks: int, max_num_seqs: int) -> Speculator:
    """num_blocks: the target's pool; the draft's holds as many tokens plus every sequence's draft tail (KV
    memory is only backed once written, so the headroom costs nothing unused)."""
    if config.method == "ngram":
        return Speculator(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
    if config.method == "suffix":
        return Speculator(config, SuffixProposer(config.suffix_decoding_max_tree_depth,
                                                 config.suffix_decoding_max_cached_requests,
                                                 config.suffix_decoding_max_spec_factor,
                                                 config.suffix_decoding_min_token_prob))
    if draft_model is None:
        raise ValueError("speculative_config.method 'draft_model' needs a draft model (see load_draft_model)")
    extra = max_num_seqs * (-(-config.num_speculative_tokens // block_size) + 1)
    return Speculator(config, DraftModelProposer(draft_model, draft_dtype, block_size, num_blocks + extra))
