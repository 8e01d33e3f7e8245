"""LLM: the offline Python API (vLLM-shaped): load once, then generate or chat over many prompts."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.config import CacheInfo
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.kv_events import KVEventsConfig
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine_args import EngineArgs
from tokenmill.hardware import resolve_dtype, resolve_threads
from tokenmill.kernels import build as kernel_build
from tokenmill.kernels import native
from tokenmill.kernels.gpu import tensor_device as gpu_tensor_device
from tokenmill.model.build import build_model
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.loader.checkpoint import Checkpoint, load_checkpoint
from tokenmill.model.placement import default_dtype, resolve_device, to_gpu
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill")

PromptInput = str | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """`LLM()` serves the embedded default model; `LLM(model="x.gguf" | "hf_dir", dtype=..., quantization=...)`
    any other. Every keyword argument is a field of EngineArgs (group_size, kv_cache_memory, block_size,
    kv_cache_dtype, max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching,
    speculative_config, threads), documented there; `EngineArgs(...).create_llm()` builds the same engine."""

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", quantization: str | None = None, *,
                 progress: bool = False, **kwargs: Any) -> None:
        started = time.perf_counter()
        self.engine_args = args = EngineArgs(model, dtype, quantization, **kwargs)
        tp = args.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        threads = resolve_threads(args.threads) if tp == 1 else max(1, resolve_threads(args.threads) // tp)
        torch.set_num_threads(threads)  # before the model builds: repacking runs on these
        if args.seed is not None:
            torch.manual_seed(args.seed)  # the generator of unseeded requests (the engine core inherits it)
        cache_config, scheduler_config = args.cache_config(), args.scheduler_config()  # bad settings fail fast
        self.speculative_config = SpeculativeConfig.parse(args.speculative_config)
        kv_events = KVEventsConfig.parse(args.kv_events_config)
        self.checkpoint: Checkpoint = load_checkpoint(args.model)
        self.tokenizer = self.checkpoint.tokenizer
        self.quant_config = args.quant_config(self.checkpoint)
        self.device = resolve_device(args.device)
        # packed kernels take float32 activations; "auto" keeps bfloat16 for float weights on native-bf16 CPUs
        self.dtype = torch.float32 if self.quant_config and dtype == "auto" else resolve_dtype(dtype)
        if dtype == "auto" and self.device == "cuda":
            self.dtype = default_dtype(self.device)
        weight_cache = kernel_build.cache_dir() / "weights" if args.weight_cache else None
        if tp > 1:
            if self.device != "cpu":
                raise ValueError("tensor_parallel_size > 1 runs on the CPU path: use device='cpu'")
            if cache_config.kv_cache_smoothing:
                raise ValueError("kv_cache_smoothing is not supported with tensor_parallel_size > 1 (its calibration "
                                 "runs the whole model in one process): leave it unset or False")
            cache_config.kv_cache_smoothing = False
            if cache_config.kv_cache_recent_blocks:
                raise ValueError("kv_cache_recent_blocks is not supported with tensor_parallel_size > 1 (the workers "
                                 "do not see the twins' assignments): leave it unset or 0")
            cache_config.kv_cache_recent_blocks = 0
            from tokenmill.distributed import tensor_parallel
            self.model = tensor_parallel.build_shard(self.checkpoint, tensor_parallel.Shard(0, tp), self.dtype,
                                                     self.quant_config, progress)
        else:
            self.model = build_model(self.checkpoint, self.dtype, self.quant_config, progress=progress,
                                     weight_cache=weight_cache)
        gpu = None
        if self.device == "cuda":
            self.model = to_gpu(self.model)
            gpu = gpu_tensor_device()
        draft_model, draft_dtype = None, None
        if self.speculative_config is not None and self.speculative_config.method == "draft_model":
            from tokenmill.engine.spec_decode.draft_model import load_draft_model

            draft_model, draft_dtype = load_draft_model(self.speculative_config, args.model, self.dtype,
                                                        self.checkpoint.config.vocab_size)
        self.engine = LLMEngine(self.model, self.tokenizer, self.dtype, cache_config, scheduler_config,
                                self.speculative_config, draft_model, draft_dtype, gpu, args.enforce_eager)
        if tp > 1:
            tensor_parallel.attach(args, self.engine, self.dtype, self.quant_config, threads)
        if kv_events is not None:
            self.engine.publish_kv_events(kv_events)
        self.load_seconds = time.perf_counter() - started
        self._next_id = 0
        logger.info("%s", self.describe())

    def describe(self) -> str:
        """What the build resolved, in one line: the kernel switches ($TOKENMILL_NATIVE_KERNELS,
        $TOKENMILL_FUSED_DECODE) and the KV dtype are decided deep in the stack, so read back from the result."""
        packed = any(isinstance(m, QuantizedLinear) for m in self.model.modules())
        weights = "packed" if packed else str(self.dtype).removeprefix("torch.")
        if self.device == "cuda":
            kernels = "Triton kernels" + (" (interpreted on the CPU)" if self.engine.runner.gpu.type == "cpu" else "")
        elif native.available() and self.dtype == torch.float32:  # the native kernels take float32 activations
            kernels = f"native kernels ({kernel_build.isa_name(native.library())})"
        else:
            kernels = "PyTorch kernels"
        runner = self.engine.runner
        step = "fused decode step" if runner.fused is not None else "module decode step"
        if runner.gpu is not None:
            graphs = runner.decode_graphs
            step = "eager steps" if graphs is None else \
                f"decode steps as CUDA graphs ({len(graphs.graphs)} sizes)" if graphs.graphs else \
                "decode steps at fixed sizes, eager (no CUDA)"
        kv = self.engine.kv_cache.info.kv_cache_dtype
        spec = f", speculative {self.speculative_config.method}" if self.speculative_config else ""
        if self.engine_args.tensor_parallel_size > 1:
            spec += f", tensor parallel over {self.engine_args.tensor_parallel_size} processes"
        name = self.config.name or self.checkpoint.path.name
        return f"{name}: {weights} weights on {kernels}, {step}, KV {kv}, {torch.get_num_threads()} threads{spec}"

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do without them; they also end with this process)."""
        close = getattr(self.engine.runner, "close", None)
        if close is not None:
            close()

    def cache_info(self) -> CacheInfo:
        """The KV cache's blocks, block size, element type and bytes per block."""
        return self.engine.kv_cache.info

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (vLLM's name for it)."""
        return self.tokenizer

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
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
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

    def score(self, prompt: str | Sequence[int]) -> torch.Tensor:
        """Logits [tokens, vocab] at every position of one prompt, in one uncached pass: the public way to score
        text (log-likelihoods, perplexity). Text is tokenized as `generate` tokenizes it."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine.runner.score(ids)

    def embed(self, prompts: PromptInput | Sequence[PromptInput],
              pooling: str = "mean") -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding: final hidden states pooled ("mean" over tokens or the "last" token's),
        L2-normalized (vLLM's `LLM.embed`; the server's /v1/embeddings)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        outputs = []
        for prompt in prompts:
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            text, ids = self.engine.input_processor.prompt(prompt)
            outputs.append(EmbeddingRequestOutput(str(self._next_id), text, ids,
                                                  EmbeddingOutput(self.engine.embed(ids, pooling))))
            self._next_id += 1
        return outputs

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False, tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render each conversation (with `tools`, OpenAI's function definitions, where the template shows them)
        with the model's chat template, then generate the assistant turn (or, with continue_final_message and
        add_generation_prompt=False, the rest of the last message), as vLLM's LLM.chat."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations:
            raise ValueError("messages is empty: pass at least one message")
        template = self.tokenizer.apply_chat_template
        options = dict(add_generation_prompt=add_generation_prompt, tools=tools,
                       continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
        prompts = [{"prompt_token_ids": template(c, tokenize=True, **options)} for c in conversations]
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
