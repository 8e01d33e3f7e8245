"""LLM: the offline Python API (vLLM-shaped): load once, then generate or chat over many prompts."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.config import (
    DEFAULT_KV_CACHE_MEMORY,
    CacheConfig,
    QuantConfig,
    SchedulerConfig,
)
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.hardware import resolve_dtype, resolve_threads
from tokenmill.model.build import build_model
from tokenmill.model.loader import Checkpoint, load_checkpoint
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptInput = str | dict[str, Any]
Message = dict[str, Any]


def _quant_config(quantization: str | None, group_size: int, dtype: str, ckpt: Checkpoint) -> QuantConfig | None:
    """No quantization asked: a quantized checkpoint runs natively unless a float dtype is named explicitly
    (the exact float path the reference tests use)."""
    if quantization is not None:
        return QuantConfig(quantization, group_size)
    return QuantConfig("native") if dtype == "auto" and ckpt.is_quantized else None


class LLM:
    """`LLM()` serves the embedded default model; `LLM(model="x.gguf" | "hf_dir", dtype=..., quantization=...)`
    any other. quantization: None, "native", "int8" or "int4" (see QuantConfig). kv_cache_dtype: "auto" (float16
    under packed weights, else the compute dtype), "float32", "float16" or "bfloat16".
    speculative_config: as vLLM's, a dict (or its JSON text), e.g. {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_min": 2, "prompt_lookup_max": 5} or {"method": "draft_model", "model": PATH,
    "num_speculative_tokens": 4}; see engine/spec_decode/config.py. None: no speculation.
    threads: compute threads for this process (torch and the native kernels share one OpenMP pool); None: the
    OMP_NUM_THREADS environment variable if set, else the CPUs this process really has (affinity, cgroup quota).
    Use 1 on a machine whose other cores are busy: each decode step waits at barriers for its slowest thread."""

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", quantization: str | None = None, *,
                 group_size: int = 32,
                 kv_cache_memory: float = DEFAULT_KV_CACHE_MEMORY, block_size: int = 16,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto", max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, speculative_config: dict[str, Any] | str | None = None,
                 threads: int | None = None, progress: bool = False) -> None:
        started = time.perf_counter()
        torch.set_num_threads(resolve_threads(threads))  # before the model builds: repacking runs on these threads
        cache_config = CacheConfig(block_size, kv_cache_memory, enable_prefix_caching, kv_cache_dtype)
        scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
        self.speculative_config = SpeculativeConfig.parse(speculative_config)  # before loading: fail fast
        self.checkpoint: Checkpoint = load_checkpoint(model)
        self.tokenizer = self.checkpoint.tokenizer
        self.quant_config = _quant_config(quantization, group_size, dtype, self.checkpoint)
        # packed kernels take float32 activations; "auto" keeps bfloat16 for float weights on native-bf16 CPUs
        self.dtype = torch.float32 if self.quant_config and dtype == "auto" else resolve_dtype(dtype)
        self.model = build_model(self.checkpoint, self.dtype, self.quant_config, progress=progress)
        draft_model, draft_dtype = None, None
        if self.speculative_config is not None and self.speculative_config.method == "draft_model":
            from tokenmill.engine.spec_decode.draft_model import load_draft_model

            draft_model, draft_dtype = load_draft_model(self.speculative_config, model, self.dtype,
                                                        self.checkpoint.config.vocab_size)
        self.engine = LLMEngine(self.model, self.tokenizer, self.dtype, cache_config, scheduler_config,
                                self.speculative_config, draft_model, draft_dtype)
        self.load_seconds = time.perf_counter() - started
        self._next_id = 0

    @property
    def config(self):
        return self.checkpoint.config

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. A prompt is text or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self._submit(prompt, p))
            return self._run(ids, use_tqdm)
        except BaseException:  # a bad prompt or a failed step must not leave this call's requests queued
            for request_id in ids:
                self.engine.abort(request_id)
            raise

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate the assistant turn."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations:
            raise ValueError("messages is empty: pass at least one message")
        prompts = [{"prompt_token_ids": self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _submit(self, prompt: PromptInput, params: SamplingParams) -> str:
        request_id = str(self._next_id)
        self._next_id += 1
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        elif not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or a dict, got {type(prompt).__name__}")
        self.engine.add_request(request_id, prompt, params)
        return request_id

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in request_ids]
