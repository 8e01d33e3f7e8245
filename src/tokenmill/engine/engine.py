"""LLMEngine: requests in, one step of generation at a time, RequestOutputs out.

This first engine runs each sequence on its own contiguous KV cache, one after another within a
step: a correct baseline with the final interface (add_request / step / abort / has_unfinished),
which the paged, batched engine keeps.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from tokenmill.cache.contiguous import ContiguousKVCache
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import Request, Sequence
from tokenmill.model.llama import LlamaModel
from tokenmill.model.sampler import sample
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, dtype: torch.dtype, max_model_len: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_model_len = min(max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.requests: dict[str, Request] = {}

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams, priority: int = 0) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        self._check_prompt(ids)
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.stop_token_ids)
        sequences = [self._new_sequence(i, ids, params, len(ids) + max_tokens) for i in range(params.n)]
        self.requests[request_id] = Request(request_id, text, ids, params, max_tokens, stop_ids, sequences, priority)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        bad = [i for i in ids if not 0 <= i < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.model.config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the model's context is {self.max_model_len}: "
                "at least one token must fit after it"
            )

    def _new_sequence(self, index: int, prompt_ids: list[int], params: SamplingParams, max_len: int) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed + index)
        cfg = self.model.config
        return Sequence(
            index=index,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens,
                                               params.include_stop_str_in_output),
            generator=generator,
            cache=ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_len, self.dtype),
        )

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.abort()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Advance every unfinished sequence by one token (the first step of a request is its prefill)."""
        outputs = []
        for request in list(self.requests.values()):
            for seq in request.sequences:
                if not seq.finished:
                    self._advance(request, seq)
            outputs.append(request.make_output())
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _advance(self, request: Request, seq: Sequence) -> None:
        if seq.cache.length == 0:
            ids = request.prompt_token_ids
        else:
            ids = seq.output_ids[-1:]
        start = seq.cache.length
        logits = self.model(torch.tensor(ids), torch.arange(start, start + len(ids)), seq.cache)[0]
        sampled = sample(logits, request.params, request.prompt_token_ids, seq.output_ids, seq.generator)
        request.record(seq, sampled, self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
