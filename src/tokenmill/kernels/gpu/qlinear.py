"""y = x @ W^T over a GpuWeight (quant/gpu_layout.py): the packed codes are decoded in registers, one K tile at a
time, and multiplied on the tensor cores in the activations' dtype with float32 accumulation.

A K tile of BLOCK_K elements spans BLOCK_K / 32 blocks of 32; its BLOCK_K / 2 code bytes hold each block's first
16 elements in their low nibbles and its last 16 in their high nibbles, so a tile is two products: the "low" half
(elements 32b + j) and the "high" half (32b + 16 + j), each against the matching columns of x. Decode batches
have few rows: the K range is then split over more programs (atomic float32 adds), so the GPU's multiprocessors
all stream weights.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.kernels.gpu import interpreting
from tokenmill.quant.gpu_layout import FORMATS, GpuWeight


@triton.jit
def _decode(c, e, n, high, scales, mins, supers, K, FMT: tl.constexpr, GROUP: tl.constexpr):
    """Float32 weights of rows n at elements e (broadcast shapes), from their 4 low code bits (or int8 codes) c."""
    if FMT == 3:  # q6_k: 2 high bits
        c = c | ((tl.load(high + n * (K // 4) + e // 4).to(tl.int32) >> ((e % 4) * 2)) & 3) << 4
    if FMT == 4:  # q5_0: 1 high bit
        c = c | ((tl.load(high + n * (K // 8) + e // 8).to(tl.int32) >> (e % 8)) & 1) << 4
    g = n * (K // GROUP) + e // GROUP
    s = tl.load(scales + g).to(tl.float32)
    if FMT == 2:  # q4_k: (d * sc) * q - dmin * m
        sup = (n * (K // 256) + e // 256) * 2
        d = tl.load(supers + sup).to(tl.float32)
        dmin = tl.load(supers + sup + 1).to(tl.float32)
        w = (d * s) * c.to(tl.float32) - dmin * tl.load(mins + g).to(tl.float32)
    elif FMT == 3:
        w = (tl.load(supers + n * (K // 256) + e // 256).to(tl.float32) * s) * (c - 32).to(tl.float32)
    elif FMT == 1:  # int4: scale * q + min
        w = s * c.to(tl.float32) + tl.load(mins + g).to(tl.float32)
    elif FMT == 4:
        w = s * (c - 16).to(tl.float32)
    else:
        w = s * c.to(tl.float32)
    return w


@triton.jit
def _tile(low, high, scales, mins, supers, n, k0, K, FMT: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr):
    """The weights of rows n (shape [1, BN] or scalar) at the K tile from k0: the low half [HALF, BN] at elements
    e_lo and the high half at e_lo + 16 (module docstring)."""
    h = tl.arange(0, HALF)[:, None]
    e_lo = k0 + (h // 16) * 32 + h % 16
    if FMT == 0:
        c_lo = tl.load(low + n * K + e_lo).to(tl.int32)
        c_hi = tl.load(low + n * K + e_lo + 16).to(tl.int32)
    else:
        byte = tl.load(low + n * (K // 2) + k0 // 2 + h).to(tl.int32)
        c_lo = byte & 15
        c_hi = byte >> 4
    w_lo = _decode(c_lo, e_lo, n, high, scales, mins, supers, K, FMT, GROUP)
    w_hi = _decode(c_hi, e_lo + 16, n, high, scales, mins, supers, K, FMT, GROUP)
    return w_lo, w_hi, e_lo


@triton.jit
def _qlinear_kernel(x, low, high, scales, mins, supers, bias, out, M, N, K, stride_xm, tiles_per_split,
                    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BN]
    n = tl.minimum(cols, N - 1)  # rows of W past N read row N - 1 and are not stored
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        kt = pid_k * tiles_per_split + i
        w_lo, w_hi, e_lo = _tile(low, high, scales, mins, supers, n, kt * BLOCK_K, K, FMT, GROUP, BLOCK_K // 2)
        h = tl.arange(0, BLOCK_K // 2)[None, :]
        e_row = kt * BLOCK_K + (h // 16) * 32 + h % 16  # e_lo as a row [1, HALF]
        x_lo = tl.load(x + rows * stride_xm + e_row, mask=rows < M, other=0.0)
        x_hi = tl.load(x + rows * stride_xm + e_row + 16, mask=rows < M, other=0.0)
        if IEEE:
            acc += tl.dot(x_lo, w_lo, input_precision="ieee")
            acc += tl.dot(x_hi, w_hi, input_precision="ieee")
        else:
            acc += tl.dot(x_lo, w_lo.to(x_lo.dtype))
            acc += tl.dot(x_hi, w_hi.to(x_hi.dtype))
    mask = (rows < M) & (cols < N)
    if SPLIT:  # float32 partial sums; the caller adds the bias and rounds
        tl.atomic_add(out + rows * N + cols, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out + rows * N + cols, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(ids, low, high, scales, mins, supers, out, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    i, kt = tl.program_id(0), tl.program_id(1)
    n = tl.load(ids + i)
    w_lo, w_hi, e_lo = _tile(low, high, scales, mins, supers, n, kt * BLOCK_K, K, FMT, GROUP, BLOCK_K // 2)
    tl.store(out + i * K + e_lo, w_lo)
    tl.store(out + i * K + e_lo + 16, w_hi)


def _block_k(k: int) -> int:
    return next(b for b in (128, 64, 32) if k % b == 0)


def _args(w: GpuWeight) -> tuple:
    """The weight's five tensor arguments (absent ones replaced by `scales`, never read) and its constexprs."""
    t = [w.low, w.high, w.scales, w.mins, w.supers]
    return tuple(w.scales if a is None else a for a in t), FORMATS.index(w.fmt), w.group


@functools.lru_cache(maxsize=4096)
def _config(m: int, n: int, k: int, multiprocessors: int, split: int | None) -> tuple[int, int, int, int]:
    """Block sizes and K splits of one product shape (cached: the decode loop asks for the same few every step)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    if interpreting():  # NumPy runs the programs one by one: few, wide ones
        block_n = min(1024, max(64, triton.next_power_of_2(n)))
    block_k = _block_k(k)
    tiles = k // block_k
    if split is None:
        split = max(1, 2 * multiprocessors // (triton.cdiv(m, block_m) * triton.cdiv(n, block_n)))
    split = max(d for d in range(1, min(split, tiles) + 1) if tiles % d == 0)  # splits of whole, equal tile counts
    return block_m, block_n, block_k, split


def _multiprocessors(device: torch.device) -> int:
    return 1 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def linear(x: torch.Tensor, w: GpuWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           split: int | None = None) -> torch.Tensor:
    """x [M, in] (float32, float16 or bfloat16) @ W^T (+ bias, float32 [out]) -> [M, out] in out_dtype (default
    float32), rounded once. `split`: K splits at most (default: enough programs for two per multiprocessor; a
    divisor of the K tiles is taken); split products sum in float32 first."""
    m, k = x.shape
    n = w.out_features
    out_dtype = out_dtype or torch.float32
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_m, block_n, block_k, split = _config(m, n, k, _multiprocessors(x.device), split)
    per_split = k // block_k // split
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty(m, n, dtype=out_dtype, device=x.device)
    tensors, fmt, group = _args(w)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _qlinear_kernel[grid](x, *tensors, w.scales if bias is None else bias, out, m, n, k, x.stride(0), per_split,
                          FMT=fmt, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split > 1,
                          IEEE=x.dtype == torch.float32, HAS_BIAS=bias is not None)
    if split > 1:
        out = (out if bias is None else out.add_(bias)).to(out_dtype)
    return out


def dequantize(w: GpuWeight, ids: torch.Tensor) -> torch.Tensor:
    """Float32 rows [len(ids), in] of W (the embedding lookup)."""
    k = w.in_features
    ids = ids.reshape(-1).to(device=w.low.device, dtype=torch.int64)
    out = torch.empty(ids.numel(), k, dtype=torch.float32, device=w.low.device)
    if ids.numel():
        tensors, fmt, group = _args(w)
        block_k = _block_k(k)
        _dequantize_kernel[(ids.numel(), k // block_k)](ids, *tensors, out, k, FMT=fmt, GROUP=group,
                                                        BLOCK_K=block_k)
    return out
