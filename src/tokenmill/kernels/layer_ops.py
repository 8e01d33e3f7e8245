"""Python entry points of the float32 layer kernels (csrc/layer_ops.cpp, csrc/paged_attention.cpp).

Callers check `native.enabled_for(x)` first and keep their PyTorch code as the fallback. Tensors are passed
by pointer: each function states the layout it needs (rows may be strided views of a fused projection).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from tokenmill.kernels.native import library, ptr


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] with contiguous rows -> new [..., H]."""
    h = x.shape[-1]
    rows = x.reshape(-1, h)
    out = torch.empty(x.shape, dtype=torch.float32)
    library().tm_rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), eps, rows.shape[0], h, out.data_ptr())
    return out


def act_and_mul(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """x: contiguous [T, 2I] (gate then up) -> act(gate) * up, [T, I]; act SiLU, or with gelu PyTorch's
    gelu(approximate="tanh") (the fused step runs the same row function, so both paths agree bit for bit)."""
    t, width = x.shape
    out = torch.empty(t, width // 2, dtype=torch.float32)
    library().tm_act_and_mul(x.data_ptr(), t, width // 2, int(gelu), out.data_ptr())
    return out


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on q [T, H, D] and k [T, KV, D] (each head row contiguous, tokens strided); positions int64."""
    t, h, d = q.shape
    library().tm_rotary(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), positions.data_ptr(), cos.data_ptr(),
                        sin.data_ptr(), t, h, k.shape[1], d)


# What the native cache kernels read and write, as their kv_type codes (csrc/paged_attention.h KVType): an int8
# cache comes with float32 scales, one per (slot, KV head); an int4 one (uint8, two codes a byte) with float16
# scales per 32 elements and its layer's rotation signs; a turboquant one (bits8) with float16 scales per row,
# the signs and its codes (csrc/paged_attention.h RowCodes, as bytes).
CACHE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.int8: 2, torch.uint8: 3, torch.bits8: 4}


def kv_type(cache: torch.Tensor) -> int:
    if cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"native KV-cache kernels take {', '.join(map(str, CACHE_DTYPES))} caches, not {cache.dtype}")
    return CACHE_DTYPES[cache.dtype]


def write_kv(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
             signs: torch.Tensor | None = None, k_offset: torch.Tensor | None = None,
             codes: torch.Tensor | None = None, recent: RecentRowsRef | None = None) -> None:
    """k, v: float32 [T, KV, D] with the same token stride; caches [blocks, block_size, KV, D] contiguous:
    float32, float16 (rounded to nearest), int8, int4 or turboquant (with their scales, signs, key offset and
    codes, cache/kv_cache.py; `recent`: its recent rows, written to their blocks' twins too)."""
    t, kv, d = k.shape
    library().tm_write_kv(k.data_ptr(), v.data_ptr(), k.stride(0), slot_mapping.data_ptr(), t, kv, d,
                          k_cache.data_ptr(), v_cache.data_ptr(), ptr(k_scale), ptr(v_scale), ptr(signs),
                          ptr(k_offset), ptr(codes), kv_type(k_cache), *_recent_args(recent), k_cache.shape[1])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: int = 0, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                           codes: torch.Tensor | None = None, recent: RecentRowsRef | None = None) -> torch.Tensor:
    """q: float32 [B, H, D] (token rows strided); caches as write_kv takes them; block_tables int64
    [B, max_blocks]; seq_lens int64 [B] -> float32 [B, H, D]."""
    b, h, d = q.shape
    _, block_size, kv, _ = k_cache.shape
    out = torch.empty(b, h, d, dtype=torch.float32)
    library().tm_paged_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                        ptr(k_scale), ptr(v_scale), ptr(signs), ptr(codes),
                                        block_tables.data_ptr(),
                                        block_tables.shape[1], seq_lens.data_ptr(), b, h, kv, d, block_size, scale,
                                        window, kv_type(k_cache), *_recent_args(recent), out.data_ptr())
    return out


class RecentRowsRef(NamedTuple):
    """A compressed cache's recent rows as the kernels read them (csrc/paged_attention.h KVCacheRef): one layer's
    float16 twins [twins, block_size, KV, D] of K and V, each block's twin (int32 [blocks], -1 none) and how many
    blocks up to a query's own it reads from them."""

    k: torch.Tensor
    v: torch.Tensor
    twin_of: torch.Tensor
    blocks: int


def _recent_args(recent: RecentRowsRef | None) -> tuple:
    if recent is None:
        return None, None, None, 0
    return recent.k.data_ptr(), recent.v.data_ptr(), recent.twin_of.data_ptr(), recent.blocks
