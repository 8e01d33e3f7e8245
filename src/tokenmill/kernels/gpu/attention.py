"""Paged attention on the GPU: every query row attends to its own sequence's keys, read in place from the block
cache, with an online softmax. One kernel serves decodes, verify runs and prefill chunks alike (the native CPU
step's model, kernels/csrc/paged_attention.cpp): row t sees the first lens[t] keys of its block table (its prefix
and itself), or, with a sliding window, the last `window` of them. A program takes one row and one KV head; the
query heads sharing that KV head (GQA) are the rows of its products.

Caches: float32, float16 or bfloat16 elements, or int8 codes with a float32 scale per token and head (applied to
the scores and to the probabilities, so the codes go to the tensor cores as they are).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(q, k, v, k_scale, v_scale, tables, lens, out, scale, window,
                      stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_tab,
                      stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr,
                      IEEE: tl.constexpr):
    t, kv = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    q_mask = (g < GROUP) & (d < D)
    query = tl.load(q + t * stride_qt + (kv * GROUP + g) * stride_qh + d, mask=q_mask, other=0.0)
    length = tl.load(lens + t).to(tl.int32)
    start = 0
    if window > 0:
        start = tl.maximum(length - window, 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range((start // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = (pos >= start) & (pos < length)
        block = tl.load(tables + t * stride_tab + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv * stride_ch
        kv_mask = valid[:, None] & (d < D)
        keys = tl.load(k + row[:, None] + d, mask=kv_mask, other=0.0).to(query.dtype)
        if IEEE:
            s = tl.dot(query, tl.trans(keys), input_precision="ieee")
        else:
            s = tl.dot(query, tl.trans(keys))
        if INT8:
            srow = block * stride_sb + (pos % BLOCK_SIZE) * stride_st + kv
            s = s * tl.load(k_scale + srow, mask=valid, other=0.0)[None, :]
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:
            p = p * tl.load(v_scale + srow, mask=valid, other=0.0)[None, :]
        values = tl.load(v + row[:, None] + d, mask=kv_mask, other=0.0).to(query.dtype)
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
    """q [T, heads, D]; caches [blocks, block_size, kv_heads, D] (int8: with scales [blocks, block_size,
    kv_heads]); tables [T, width] block ids per row; lens [T] keys row t sees, counted from its table's first
    slot; window: keys a row sees at most (0: all). -> [T, heads, D] in q's dtype."""
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("the K and V caches must share one layout with contiguous head rows")
    out = torch.empty_like(q)
    if rows == 0:
        return out
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None or k_scale.stride() != v_scale.stride()
                 or k_scale.stride(-1) != 1):
        raise ValueError("an int8 cache needs K and V scales [blocks, block_size, kv_heads] of one layout")
    scales = (k_scale, v_scale) if int8 else (k_cache, v_cache)  # never read without INT8
    group = heads // kv_heads
    tables = tables if tables.stride(-1) == 1 else tables.contiguous()
    _attention_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, *scales, tables, lens, out, scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scales[0].stride(0), scales[0].stride(1), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=32, BLOCK_SIZE=block_size, INT8=int8, IEEE=q.dtype == torch.float32)
    return out
