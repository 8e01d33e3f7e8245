"""The KV tensors: per slot (see kv_layout), K and V as [num_blocks, block_size, kv_heads, head_dim], sized from a
byte budget."""
from __future__ import annotations

import mmap

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
    """K and V of one block: `slots` layers (all layers for a model without sliding windows)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * KVLayout.from_config(model).slots * block_size * model.num_kv_heads * model.head_dim * itemsize


def _lazily_zeroed(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed memory that the OS only backs with pages once written.

    An anonymous mmap is guaranteed to read as zeros (so unwritten slots are finite, which matters
    when masked attention multiplies them by 0) and costs resident memory only for blocks in use.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(numel * itemsize, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=numel)


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.layout = KVLayout.from_config(model)
        shape = (self.layout.slots, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        numel = 1
        for d in shape:
            numel *= d
        self.k = _lazily_zeroed(numel, dtype).view(shape)
        self.v = _lazily_zeroed(numel, dtype).view(shape)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks [num_blocks, block_size, kv_heads, head_dim] that model layer `layer` reads and writes."""
        slot = self.layout.slot_of[layer]
        return self.k[slot], self.v[slot]
