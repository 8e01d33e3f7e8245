"""The KV tensors: per slot (see kv_layout), K and V as [num_blocks, block_size, kv_heads, head_dim], sized from a
byte budget. An int8 cache also keeps one float32 scale per (slot, token, KV head) for K and for V:
x = scale * code, scale = max|x| / 127 over the head's row (symmetric, per token and head)."""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tokenmill.cache.kv_layout import KVLayout
from tokenmill.config import ModelConfig
from tokenmill.kernels.native import available as kernels_available


def resolve_kv_dtype(name: str, compute_dtype: torch.dtype, packed_weights: bool) -> torch.dtype:
    """The cache's element type for CacheConfig.kv_cache_dtype `name`. "auto": float16 when packed weights run
    on the native kernels in float32 (the native-quantized default), else the compute dtype. Why: at high
    concurrency a float32 cache streams several times more bytes per step than the weights; float16 halves
    that (F16C converts on load), as llama.cpp's f16 and vLLM's bf16 caches do. The exact float paths (an
    explicit float dtype, unquantized weights) keep the compute dtype, so reference tests see no rounding."""
    if name == "auto":
        native = packed_weights and compute_dtype == torch.float32 and kernels_available()
        return torch.float16 if native else compute_dtype
    return getattr(torch, name)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block: `slots` layers (all layers for a model without sliding windows), with int8's
    scales."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_head = model.head_dim * itemsize + (4 if dtype == torch.int8 else 0)
    return 2 * KVLayout.from_config(model).slots * block_size * model.num_kv_heads * per_head


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] float32 -> int8 codes and float32 scales [...], as the native write computes them (the
    same float32 operations, rounded to nearest even), so both paths store the same bytes."""
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[..., None]).to(torch.int8), amax / 127.0


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_int8's inverse, float32 [..., head_dim]."""
    return codes.float() * scales[..., None]


class LayerKV(NamedTuple):
    """One model layer's view of the cache: K and V [num_blocks, block_size, kv_heads, head_dim] and, for int8,
    their scales [num_blocks, block_size, kv_heads] (None otherwise)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def _lazily_zeroed(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed memory that the OS only backs with pages once written.

    An anonymous mmap is guaranteed to read as zeros (so unwritten slots are finite, which matters
    when masked attention multiplies them by 0) and costs resident memory only for blocks in use.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(numel * itemsize, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=numel)


@dataclass(frozen=True)
class CacheInfo:
    """What LLM.cache_info() and /metrics' cache_config_info report (vLLM's cache config info)."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: str
    bytes_per_block: int


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.info = CacheInfo(num_blocks, block_size, str(dtype).removeprefix("torch."),
                              bytes_per_block(model, block_size, dtype))
        self.layout = KVLayout.from_config(model)
        shape = (self.layout.slots, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        numel = 1
        for d in shape:
            numel *= d
        self.k = _lazily_zeroed(numel, dtype).view(shape)
        self.v = _lazily_zeroed(numel, dtype).view(shape)
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = _lazily_zeroed(numel // model.head_dim, torch.float32).view(shape[:-1])
            self.v_scale = _lazily_zeroed(numel // model.head_dim, torch.float32).view(shape[:-1])

    def layer(self, layer: int) -> LayerKV:
        """The blocks that model layer `layer` reads and writes."""
        slot = self.layout.slot_of[layer]
        if self.k_scale is None:
            return LayerKV(self.k[slot], self.v[slot])
        return LayerKV(self.k[slot], self.v[slot], self.k_scale[slot], self.v_scale[slot])
