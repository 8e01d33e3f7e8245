"""The GPU path's small per-layer kernels, one launch each where PyTorch's eager ops take several: RMSNorm (6
kernels in PyTorch), rotary embedding of q and k in place (12), activation-and-multiply of the gated MLP (3), and
the float KV cache write (4). A decode step of a small model is bound by kernel launches (even replayed as a CUDA
graph, each launch costs microseconds against a step of ~1 ms), so the count is what these save. Arithmetic is in
float32, each result rounded once to its dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x, w, out, stride_x, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    v = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (v * tl.rsqrt(tl.sum(v * v, 0) / H + eps)).to(x.dtype.element_ty)  # rounded as the reference does
    y = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32) * normed.to(tl.float32)
    tl.store(out + row * H + cols, y.to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim, in the dtype weight * x has (layers/norm.py's reference)."""
    h = x.shape[-1]
    rows = x.reshape(-1, h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), h, eps,
                                           BLOCK=triton.next_power_of_2(h))
    return out


@triton.jit
def _rotary_kernel(q, k, positions, cos, sin, stride_qt, stride_qh, stride_kt, stride_kh, HEADS, D,
                   HALF: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    if h < HEADS:
        base = q + t * stride_qt + h * stride_qh
    else:
        base = k + t * stride_kt + (h - HEADS) * stride_kh
    p = tl.load(positions + t)
    i = tl.arange(0, HALF)
    mask = i < D // 2
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + p * D + i, mask=mask, other=0.0)
    s1 = tl.load(sin + p * D + i, mask=mask, other=0.0)
    c2 = tl.load(cos + p * D + D // 2 + i, mask=mask, other=0.0)
    s2 = tl.load(sin + p * D + D // 2 + i, mask=mask, other=0.0)
    tl.store(base + i, (x1 * c1 - x2 * s1).to(base.dtype.element_ty), mask=mask)
    tl.store(base + D // 2 + i, (x2 * c2 + x1 * s2).to(base.dtype.element_ty), mask=mask)


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, rotate-half layout: q [T, H, D], k [T, KV, D] (head rows contiguous); cos, sin float32
    [positions, D]."""
    t, heads, d = q.shape
    if t:
        _rotary_kernel[(t, heads + k.shape[1])](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0),
                                                k.stride(1), heads, d, HALF=triton.next_power_of_2(d // 2))


@triton.jit
def _act_and_mul_kernel(x, out, stride_x, width, GELU: tl.constexpr, BLOCK: tl.constexpr):
    t, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + t * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # PyTorch's gelu(approximate="tanh"), tanh(z) = 1 - 2 / (exp(2z) + 1)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * z, 80.0)) + 1.0))  # (exp(80) is finite)
    else:
        act = gate / (1.0 + tl.exp(tl.minimum(-gate, 80.0)))
    tl.store(out + t * width + cols, (act * up).to(out.dtype.element_ty), mask=mask)


def act_and_mul(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """x [T, 2I] (gate then up) -> act(gate) * up [T, I]: SiLU, or GELU (tanh approximation)."""
    t, width = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, width, dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(width))
        _act_and_mul_kernel[(t, triton.cdiv(width, block))](x, out, x.stride(0), width, GELU=gelu, BLOCK=block)
    return out


@triton.jit
def _write_kv_kernel(k, v, slots, k_cache, v_cache, stride_kt, stride_kh, stride_cb, stride_ct, stride_ch,
                     BLOCK_SIZE, D, BLOCK_D: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + t)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + h * stride_ch
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    src = t * stride_kt + h * stride_kh + d
    tl.store(k_cache + dst + d, tl.load(k + src, mask=mask).to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + dst + d, tl.load(v + src, mask=mask).to(v_cache.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
    """k, v [T, KV, D] (one layout, head rows contiguous) into float caches [blocks, block_size, KV, D] at flat
    slots [T], rounded to the caches' dtype."""
    t, heads, d = k.shape
    if k.stride() != v.stride() or k_cache.stride() != v_cache.stride() or k.stride(-1) != 1:
        raise ValueError("k and v (and their caches) must share one layout with contiguous head rows")
    if t:
        _write_kv_kernel[(t, heads)](k, v, slots, k_cache, v_cache, k.stride(0), k.stride(1), k_cache.stride(0),
                                     k_cache.stride(1), k_cache.stride(2), k_cache.shape[1], d,
                                     BLOCK_D=triton.next_power_of_2(d))
