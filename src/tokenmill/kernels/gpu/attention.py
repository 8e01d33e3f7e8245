"""Paged attention on the GPU: every query row attends to its own sequence's keys, read in place from the block
cache, with an online softmax. One kernel serves decodes, verify runs and prefill chunks alike (the native CPU
step's model, kernels/csrc/paged_attention.cpp): row t sees the first lens[t] keys of its block table (its prefix
and itself), or, with a sliding window, the last `window` of them. A program takes one row and one KV head; the
query heads sharing that KV head (GQA) are the rows of its products.

Caches (cache/kv_cache.py): float32, float16 or bfloat16 elements; int8 codes with a float32 scale per token and
head; int4 codes (two per byte, per 32: byte j holds element j low and j + 16 high) with a float16 scale per 32,
x = scale * (code - 8), in the rotated space: the caller turns queries by the rotation and outputs back. Codes
are decoded in registers; no dequantized copy of the cache is made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT, INT8, INT4 = 0, 1, 2  # the kernel's KV_FMT


@triton.jit
def _load_rows(cache, scales, row, srow, d, valid, D: tl.constexpr, KV_FMT: tl.constexpr):
    """Float32 values [rows, BLOCK_D] of the valid cache rows at element offsets `row` (scales at `srow`)."""
    mask = valid[:, None] & (d < D)
    if KV_FMT == 2:
        byte = tl.load(cache + row[:, None] + (d // 32) * 16 + d % 16, mask=mask, other=0).to(tl.int32)
        codes = (byte >> ((d % 32) // 16 * 4)) & 15
        group_scale = tl.load(scales + srow[:, None] + d // 32, mask=mask, other=0.0).to(tl.float32)
        values = group_scale * (codes - 8).to(tl.float32)
    elif KV_FMT == 1:
        values = tl.load(cache + row[:, None] + d, mask=mask, other=0).to(tl.float32)
        values = values * tl.load(scales + srow, mask=valid, other=0.0)[:, None]
    else:
        values = tl.load(cache + row[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    return values


@triton.jit
def _attention_kernel(q, k, v, k_scale, v_scale, tables, lens, out, scale, window,
                      stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                      stride_tab, stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_FMT: tl.constexpr,
                      IEEE: tl.constexpr):
    t, kv = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    q_mask = (g < GROUP) & (d < D)
    query = tl.load(q + t * stride_qt + (kv * GROUP + g) * stride_qh + d, mask=q_mask, other=0.0)
    length = tl.load(lens + t).to(tl.int32)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range((start // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = (pos >= start) & (pos < length)
        block = tl.load(tables + t * stride_tab + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv * stride_ch
        srow = block * stride_sb + (pos % BLOCK_SIZE) * stride_st + kv * stride_sh
        keys = _load_rows(k, k_scale, row, srow, d, valid, D, KV_FMT).to(query.dtype)
        if IEEE:
            s = tl.dot(query, tl.trans(keys), input_precision="ieee")
        else:
            s = tl.dot(query, tl.trans(keys))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        values = _load_rows(v, v_scale, row, srow, d, valid, D, KV_FMT).to(query.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(query.dtype), values)
        m_i = m_new
    result = acc / l_i[:, None]
    tl.store(out + t * stride_ot + (kv * GROUP + g) * stride_oh + d, result.to(out.dtype.element_ty), mask=q_mask)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    lens: torch.Tensor, scale: float, window: int = 0, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, heads, D]; caches [blocks, block_size, kv_heads, D] (int4: D / 2 bytes) with, for int8, scales
    [blocks, block_size, kv_heads], for int4 [blocks, block_size, kv_heads, D / 32]; tables [T, width] block
    ids per row; lens [T] keys row t sees, counted from its table's first slot; window: keys a row sees at most
    (0: all). -> [T, heads, D] in q's dtype (int4: in the rotated space, as q is)."""
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("the K and V caches must share one layout with contiguous head rows")
    out = torch.empty_like(q)
    if rows == 0:
        return out
    fmt = {torch.int8: INT8, torch.uint8: INT4}.get(k_cache.dtype, FLOAT)
    if fmt != FLOAT and (k_scale is None or v_scale is None or k_scale.stride() != v_scale.stride()
                         or k_scale.stride(-1) != 1):
        raise ValueError("an int8 or int4 cache needs K and V scales of one layout")
    scales = (k_scale, v_scale) if fmt != FLOAT else (k_cache, v_cache)  # never read for float caches
    group = heads // kv_heads
    tables = tables if tables.stride(-1) == 1 else tables.contiguous()
    _attention_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, *scales, tables, lens, out, scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scales[0].stride(0), scales[0].stride(1), scales[0].stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=32, BLOCK_SIZE=block_size, KV_FMT=fmt, IEEE=q.dtype == torch.float32)
    return out
