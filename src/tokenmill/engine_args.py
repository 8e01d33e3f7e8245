"""EngineArgs: every engine setting once (vLLM's pattern). The CLI flags, `LLM(...)`'s keyword arguments and the
`serve`, `generate`, `chat` and `bench` commands all read this one dataclass, so a new setting is added here only."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.config import (
    DEFAULT_KV_CACHE_MEMORY,
    DEVICES,
    DTYPE_NAMES,
    KV_CACHE_BITS,
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    CacheConfig,
    QuantConfig,
    SchedulerConfig,
)

if TYPE_CHECKING:
    from tokenmill.llm import LLM
    from tokenmill.model.loader.checkpoint import Checkpoint

_UNIT_BYTES = {"": 1, "b": 1, **{f"{u}{b}": 1000 ** (i + 1) for i, u in enumerate("kmgt") for b in ("", "b")},
               **{f"{u}ib": 1024 ** (i + 1) for i, u in enumerate("kmgt")}}


def parse_memory(text: str) -> int | float:
    """--kv-cache-memory: whole bytes with an optional unit (B; K/KB = 10^3 ... T/TB = 10^12; KiB = 2^10 ...
    TiB = 2^40; any case), or a fraction of available memory in (0, 1]. A bare number above 1 must be whole:
    "1.5" is neither (type=float used to read it as 1 byte)."""
    match = re.fullmatch(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in _UNIT_BYTES or not math.isfinite(float(match.group(1))):
        raise argparse.ArgumentTypeError(f"expected bytes (e.g. 4GiB, 512MB, 1073741824) or a fraction of memory "
                                         f"in (0, 1] (e.g. 0.5), got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    if not unit and 0 < value <= 1:
        return value
    size = value * _UNIT_BYTES[unit]
    if _UNIT_BYTES[unit] == 1 and not size.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction of memory in (0, 1] nor a whole number "
                                         "of bytes; give a unit for a size (e.g. 1.5GiB)")
    if not 1 <= size < math.inf:
        raise argparse.ArgumentTypeError(f"a KV cache size is at least 1 byte and finite, got {text!r}")
    return int(size)


def add_models_dir_arg(parser: argparse.ArgumentParser) -> None:
    """--models-dir: not an engine field; `tokenmill` puts it in $TOKENMILL_MODELS_DIR, which every name lookup
    reads (also `info` and `models`, which load no engine)."""
    parser.add_argument("--models-dir", default=None,
                        help="folder of local GGUF files / HF model folders that model names resolve to "
                             "(default: $TOKENMILL_MODELS_DIR, else ~/.cache/tokenmill/models)")


@dataclass
class EngineArgs:
    """The settings of one engine. model: a .gguf file, HF model directory or model name (None: the embedded
    default). quantization: None, "native", "int8" or "int4" (see QuantConfig). kv_cache_memory: bytes, or a
    fraction in (0, 1] of available memory. kv_cache_dtype: "auto" (float16 under packed weights, else the
    compute dtype), "float32", "float16", "bfloat16", "int8" (codes with a scale per token and KV head), "int4"
    (rotated, 4-bit codes per group of 32) or "turboquant" (rotated, Lloyd-Max codes at kv_cache_bits per element,
    2.5-4, default 3.5; cache/kv_cache.py). kv_cache_smoothing: int4 and turboquant caches divide keys and multiply
    queries by calibrated per-channel factors before the rotation (scores unchanged, less quantization error in
    them; model/kv_smoothing.py); None: on for those caches on the CPU path in one process, True: on (an error
    where it cannot be), False: off. kv_cache_recent_blocks: compressed caches keep the rows of each sequence's
    newest blocks also in float16, and each query reads its aligned group of n blocks up to its own from there (KIVI's
    full-precision window; cache/recent_rows.py); None: 2 for int4 and turboquant on the CPU path in one process,
    else 0.
    speculative_config: as vLLM's, a dict (or its JSON text), e.g.
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    {"method": "suffix", "num_speculative_tokens": 16} or
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}; see engine/spec_decode/config.py;
    None: no speculation. kv_events_config: as vLLM's, a dict (or its JSON text), e.g. {"enable_kv_cache_events":
    true, "publisher": "zmq", "endpoint": "tcp://*:5557"}: prefix-cache changes published over ZeroMQ for KV-aware
    routers (engine/kv_events.py). threads: compute threads for this process (torch and the native kernels share one
    OpenMP pool); None: $OMP_NUM_THREADS if set, else the CPUs this process really has (affinity, cgroup quota).
    Use 1 on a machine whose other cores are busy: each decode step waits at barriers for its slowest thread.
    weight_cache: keep a GGUF's repacked weights under $TOKENMILL_CACHE_DIR/weights and map them at later starts
    (model/weight_cache.py). seed: seeds the random draws of requests that bring no seed of their own (as vLLM's),
    so a run of unseeded requests repeats; None: a fresh seed each start. device: "cpu", "cuda" (the GPU path: Triton
    kernels, weights and KV on the GPU; model/placement.py) or "auto" (cuda where a CUDA GPU and Triton are present).
    enforce_eager: the GPU path runs every step eagerly instead of replaying decode steps as CUDA graphs
    (model/decode_graphs.py); the CPU path is always eager. tensor_parallel_size: processes the model's heads and FFN
    channels are split over (torch.distributed, gloo; CPU path; distributed/tensor_parallel.py); threads and
    kv_cache_memory are then per process."""

    model: str | Path | None = None
    dtype: str = "auto"
    quantization: str | None = None
    group_size: int = 32
    kv_cache_memory: int | float = DEFAULT_KV_CACHE_MEMORY
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_bits: float | None = None
    kv_cache_smoothing: bool | None = None
    kv_cache_recent_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    speculative_config: dict[str, Any] | str | None = None
    kv_events_config: dict[str, Any] | str | None = None
    threads: int | None = None
    weight_cache: bool = True
    seed: int | None = None
    device: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1

    def output_identity(self) -> dict[str, Any]:
        """The settings a deterministic request's output depends on (the server's result cache keys on them)."""
        return {"model": str(self.model), "dtype": self.dtype, "quantization": self.quantization,
                "group_size": self.group_size, "kv_cache_dtype": self.kv_cache_dtype,
                "kv_cache_bits": self.kv_cache_bits, "kv_cache_smoothing": self.kv_cache_smoothing,
                "kv_cache_recent_blocks": self.kv_cache_recent_blocks,
                "device": self.device,
                "tensor_parallel_size": self.tensor_parallel_size}

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per field, named as vLLM's CLI names them, plus --models-dir."""
        p = parser
        p.add_argument("--model", default=None,
                       help="a .gguf file, HF model directory or model name from `tokenmill models` "
                            "(default: embedded SmolLM2-135M-Instruct)")
        add_models_dir_arg(p)
        p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                       help="compute dtype; auto: the packed weights of a quantized GGUF, else bfloat16 where the CPU "
                            "has it natively, float32 elsewhere; half/float16 (emulated on CPUs) take that same "
                            "16-bit choice, as vLLM's CPU backend casts float16")
        p.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                       help="weight format: native (a GGUF's own blocks; the default with --dtype auto), int8, int4")
        p.add_argument("--group-size", type=int, default=32, help="int4 group size (inputs per scale)")
        p.add_argument("--kv-cache-memory", type=parse_memory, default=DEFAULT_KV_CACHE_MEMORY, metavar="SIZE",
                       help="KV cache size: bytes with an optional unit (4GiB = 4*2^30, 4GB = 4G = 4*10^9; also K, M, "
                            "T, KiB, MiB, TiB) or a fraction in (0, 1] of available memory (default 4GiB); per model: "
                            "`serve` with several models gives each engine a budget of this size (as vLLM: one per "
                            "engine)")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                       help="KV cache element type; auto: float16 when packed weights run natively, else the "
                            "compute dtype (as vLLM's --kv-cache-dtype auto, with llama.cpp's f16 cache as the "
                            "native default); int8: codes with a scale per token and KV head; int4: rotated "
                            "(Walsh-Hadamard with random signs), 4-bit codes and a float16 scale per 32 elements; "
                            "turboquant: rotated, Lloyd-Max codes at --kv-cache-bits per element")
        p.add_argument("--kv-cache-bits", type=float, default=None, choices=KV_CACHE_BITS,
                       help="turboquant's bits per element (default 3.5)")
        p.add_argument("--kv-cache-smoothing", action=argparse.BooleanOptionalAction, default=None,
                       help="int4, turboquant: divide keys and multiply queries by calibrated per-channel factors "
                            "before the rotation (scores unchanged, less quantization error; SmoothAttention); "
                            "default: on for those caches on the CPU path without tensor parallelism")
        p.add_argument("--kv-cache-recent-blocks", type=int, default=None, metavar="N",
                       help="int8, int4, turboquant: each query reads its aligned group of N blocks, up to its "
                            "own, from float16 twins kept for them (KIVI's full-precision recent window); default: "
                            "2 for int4 and turboquant on the CPU path without tensor parallelism, else 0")
        p.add_argument("--max-num-seqs", type=int, default=256)
        p.add_argument("--max-num-batched-tokens", type=int, default=512)
        p.add_argument("--max-model-len", type=int, default=None)
        p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--speculative-config", default=None, metavar="JSON",
                       help='speculative decoding, as vLLM: \'{"method": "ngram", "num_speculative_tokens": 4}\', '
                            '\'{"method": "suffix", "num_speculative_tokens": 16}\' or '
                            '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\' (default: off)')
        p.add_argument("--kv-events-config", default=None, metavar="JSON",
                       help='publish KV cache events as vLLM: \'{"enable_kv_cache_events": true, "publisher": "zmq", '
                            '"endpoint": "tcp://*:5557", "topic": "kv-events"}\' (also replay_endpoint, buffer_steps, '
                            'hwm, max_queue_size; default: off)')
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="compute threads (default: $OMP_NUM_THREADS if set, else the CPUs this process may use: "
                            "affinity and cgroup quota); use 1 when other processes keep the cores busy, as every "
                            "decode step waits for its slowest thread")
        p.add_argument("--weight-cache", action=argparse.BooleanOptionalAction, default=True,
                       help="keep a GGUF's repacked weights on disk ($TOKENMILL_CACHE_DIR/weights) and map them at "
                            "later starts instead of repacking (default: on)")
        p.add_argument("--device", choices=DEVICES, default="auto",
                       help="cpu, or cuda: the GPU path (Triton kernels over the packed weights, KV on the GPU; "
                            "needs the gpu extra); auto: cuda where a CUDA GPU and Triton are present, else cpu")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                       help="split the model's attention heads and FFN channels over N processes (torch.distributed, "
                            "gloo; CPU path); --threads and --kv-cache-memory are then per process")
        p.add_argument("--enforce-eager", action="store_true",
                       help="GPU path: run decode steps eagerly instead of as CUDA graphs (the CPU path always is)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The fields from parsed flags; overrides (e.g. one of several `serve` models) win. `seed` is not one of
        add_cli_args' flags: `generate` and the benchmarks have a --seed of their own meaning; `serve` passes its
        --seed as an override."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "seed"} | overrides)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as `LLM(**kwargs)` takes them (a shallow copy: asdict would deep-copy a config dict)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def create_llm(self, progress: bool = False) -> LLM:
        from tokenmill.llm import LLM

        return LLM(**self.as_kwargs(), progress=progress)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_memory, self.enable_prefix_caching, self.kv_cache_dtype,
                           self.kv_cache_bits, self.kv_cache_smoothing, self.kv_cache_recent_blocks)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)

    def quant_config(self, ckpt: Checkpoint) -> QuantConfig | None:
        """No quantization asked: a quantized checkpoint runs natively unless a float dtype is named explicitly
        (the exact float path the reference tests use)."""
        if self.quantization is not None:
            return QuantConfig(self.quantization, self.group_size)
        return QuantConfig("native") if self.dtype == "auto" and ckpt.is_quantized else None
