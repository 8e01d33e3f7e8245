"""Draft-model proposer: a smaller model with the target's vocabulary guesses k tokens autoregressively.

It keeps its own paged KV cache (its own pool, tables and runner), and drafts for all requests together: one
forward catching each request up on the tokens it has not seen (the whole prompt the first time, afterwards the
tokens accepted or emitted last step), then k - 1 batched single-token steps. Its KV stays valid up to where
its tokens agree with the request's; the rest is rolled back (blocks trimmed) before the next proposal.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.cache.kv_cache import COMPRESSED, KVCache
from tokenmill.cache.kv_cache_manager import KVCacheManager
from tokenmill.config import QuantConfig
from tokenmill.engine.request import Request
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.proposer import Draft
from tokenmill.model.batch import BatchChunk, StepBatch
from tokenmill.model.build import build_model
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader.checkpoint import Checkpoint, load_checkpoint
from tokenmill.model.runner import ModelRunner
from tokenmill.model.sampler import process_logits


@dataclass
class DraftSequence:
    """The draft model's view of a request: the tokens its cache was filled from."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int = 0
    num_known: int = 0  # leading tokens known to equal the request's (its length at the last sync)
    block_hashes: list[bytes] = field(default_factory=list)  # unused: the draft's cache shares no prefixes

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    def __init__(self, model: LlamaModel, dtype: torch.dtype, block_size: int, num_blocks: int) -> None:
        self.cache = KVCache(model.config, num_blocks, block_size, dtype,
                             model.key_offsets() if dtype in COMPRESSED else None)
        self.kv = KVCacheManager(num_blocks, block_size, False, self.cache.layout.windows)
        self.runner = ModelRunner(model, self.cache)
        self.sequences: dict[str, DraftSequence] = {}

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = []  # (index, request, sequence, k)
        for i, (request, k) in enumerate(zip(requests, num_tokens)):
            if k <= 0:
                continue
            seq = self._sync(request)
            if self.kv.allocate(seq, seq.num_tokens - seq.num_computed_tokens + k - 1):
                active.append((i, request, seq, k))  # out of draft blocks: this request gets no draft
        while active:
            active.sort(key=lambda e: e[2].num_tokens - e[2].num_computed_tokens != 1)  # the runner's order
            batch = StepBatch([BatchChunk(seq.token_ids[seq.num_computed_tokens:], seq.num_computed_tokens,
                                          self.kv.block_tables[seq.request_id]) for _, _, seq, _ in active])
            logits = self.runner.execute(batch)
            for (i, request, seq, _), chunk, row in zip(active, batch.chunks, logits):
                seq.num_computed_tokens += chunk.num_tokens
                token, q = _draw(row, request, drafts[i].token_ids)
                seq.token_ids.append(token)
                drafts[i].token_ids.append(token)
                if q is not None:
                    probs[i].append(q)
            active = [e for e in active if len(drafts[e[0]].token_ids) < e[3]]
        for draft, q in zip(drafts, probs):
            if q:
                draft.probs = torch.stack(q)
        return drafts

    def _sync(self, request: Request) -> DraftSequence:
        """Point the sequence at the request's tokens, keeping the KV of the prefix the two agree on."""
        seq = self.sequences.get(request.request_id)
        if seq is None:
            seq = self.sequences[request.request_id] = DraftSequence(request.request_id, [])
        valid = seq.num_known
        target = request.token_ids
        while valid < min(seq.num_computed_tokens, len(target)) and seq.token_ids[valid] == target[valid]:
            valid += 1
        seq.token_ids = list(target)
        seq.num_computed_tokens = valid
        seq.num_known = len(target)
        self.kv.trim(seq)
        return seq

    def learn(self, finished: Sequence[Request]) -> None:
        """The draft model is fixed."""

    def retain(self, request_ids: set[str]) -> None:
        for request_id in set(self.sequences) - request_ids:
            self.kv.free(self.sequences.pop(request_id))


def _draw(logits: torch.Tensor, request: Request, drafted: list[int]) -> tuple[int, torch.Tensor | None]:
    """The next draft token under the request's own sampling options; q is its distribution (None if greedy)."""
    processed = process_logits(logits, request.params, request.prompt_token_ids, request.output_ids + drafted,
                               request.rules)
    if request.params.greedy:
        return int(processed.argmax()), None
    q = processed.softmax(-1)
    return int(torch.multinomial(q, 1, generator=request.generator)), q


def load_draft_model(config: SpeculativeConfig, target: str | Path | None, target_dtype: torch.dtype,
                     vocab_size: int) -> tuple[LlamaModel, torch.dtype]:
    """Build the draft (config.model, else the target's checkpoint), optionally cut to its first num_layers and
    quantized; returns it with its activation dtype (float32 when quantized, as the packed kernels need)."""
    ckpt = load_checkpoint(config.model if config.model is not None else target)
    if config.num_layers is not None:
        ckpt = first_layers(ckpt, config.num_layers)
    if ckpt.config.vocab_size != vocab_size:
        raise ValueError(f"speculative_config.model has a vocabulary of {ckpt.config.vocab_size} tokens, the "
                         f"target {vocab_size}: a draft model must share the target's vocabulary")
    quant = QuantConfig(config.quantization) if config.quantization else (
        QuantConfig("native") if ckpt.is_quantized else None)
    dtype = torch.float32 if quant else target_dtype
    return build_model(ckpt, dtype, quant), dtype


def first_layers(ckpt: Checkpoint, num_layers: int) -> Checkpoint:
    """The checkpoint with only its first `num_layers` decoder layers (embeddings, final norm and head kept)."""
    cfg = ckpt.config
    if num_layers > cfg.num_layers:
        raise ValueError(f"speculative_config.num_layers={num_layers} exceeds the draft's {cfg.num_layers} layers")
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    weights = {name: w for name, w in ckpt.weights.items()
               if (m := layer.search(name)) is None or int(m.group(1)) < num_layers}
    types = cfg.layer_types[:num_layers] if cfg.layer_types is not None else None
    config = dataclasses.replace(cfg, num_layers=num_layers, layer_types=types)
    return dataclasses.replace(ckpt, config=config, weights=weights)
