"""Layers over QuantizedWeights: drop-in replacements for nn.Linear and nn.Embedding, chosen at load time
so the model code does not change.

QuantizedLinear picks its kernel per call from the number of rows: up to `max_kernel_rows` the native
int8-dot kernel streams the packed weight once (decode and small batches are bandwidth-bound); above it the
weight is dequantized for one float GEMM, whose cost the many rows amortize (prefill). That GEMM runs in
bfloat16 where the CPU has native bf16 (~4x float32's FLOP/s there) and in float32 elsewhere (emulated bf16
is ~70x slower).
Crossovers, measured on SmolLM2's layers (2 threads; benchmarks/kernel_crossover.py): the tiled kernel (weights
in the kernels' tiled layout) beats dequantize + GEMM at every size tried on both machine kinds: against float32
on an AVX2 machine 4x at 16 rows and still 1.14-1.21x at 512; against bfloat16 on an AVX-512 machine (Zen 4,
VNNI build) 1.3-5x from 16 to 512 rows, since dequantizing per call costs more than the GEMM saves. So it runs
for every row count (TILED_KERNEL_ROWS bounds it only nominally: the scheduler's token budget is smaller). For
weights in the row layout (1.2-1.3x faster than the GEMM at 16 rows, 1.2-1.5x slower at 32) it stays at 24 rows.
A matrix whose float copy would not fit in the caches (the vocabulary-sized LM head: 113 MB as float32)
keeps the kernel up to LARGE_MATRIX_KERNEL_ROWS rows: writing that copy costs ~55 ms, more than the kernel
takes for 64 rows.
A fused projection whose parts come in different formats (a GGUF Q4_K_M file stores v_proj as Q6_K next to
Q4_K q/k) keeps one packed part per format and concatenates their outputs.
On the GPU path (model/placement.py) the parts are GpuWeights and every row count runs the Triton kernel
(kernels/gpu/qlinear.py), imported only there: a CPU run never imports Triton.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.hardware import has_native_bf16
from tokenmill.kernels import quant_ops
from tokenmill.quant.gpu_layout import GpuWeight, gpu_layout
from tokenmill.quant.weights import QuantizedWeight

DEFAULT_MAX_KERNEL_ROWS = 24
TILED_KERNEL_ROWS = 1 << 16
LARGE_MATRIX_BYTES = 32 << 20  # float32 copy size beyond which dequantizing per call stops paying off
LARGE_MATRIX_KERNEL_ROWS = 512
GEMM_DTYPE = torch.bfloat16 if has_native_bf16() else torch.float32


class PackedMatrix(nn.Module):
    """One packed weight's tensors as buffers, so they show up in state_dict and memory accounting."""

    def __init__(self, weight: QuantizedWeight | GpuWeight) -> None:
        super().__init__()
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.weight = weight


class QuantizedLinear(nn.Module):
    def __init__(self, weights: Sequence[QuantizedWeight], bias: torch.Tensor | None = None,
                 max_kernel_rows: int | None = None) -> None:
        super().__init__()
        if max_kernel_rows is None:
            max_kernel_rows = TILED_KERNEL_ROWS if all(w.tiled for w in weights) else DEFAULT_MAX_KERNEL_ROWS
        self.parts = nn.ModuleList(PackedMatrix(w) for w in weights)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.in_features = weights[0].in_features
        self.out_features = sum(w.out_features for w in weights)
        if self.in_features * self.out_features * 4 > LARGE_MATRIX_BYTES:
            max_kernel_rows = max(max_kernel_rows, LARGE_MATRIX_KERNEL_ROWS)
        self.max_kernel_rows = max_kernel_rows if quant_ops.available() else -1  # -1: never (not even 0 rows)

        self.on_gpu = False

    @property
    def nbytes(self) -> int:
        return sum(p.weight.nbytes for p in self.parts)

    def to_gpu(self, device: torch.device) -> None:
        """The parts in the GPU kernels' layout on `device` (the rest moves with the model)."""
        self.parts = nn.ModuleList(PackedMatrix(gpu_layout(p.weight).to(device)) for p in self.parts)
        self.on_gpu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.on_gpu:
            return self._gpu_forward(rows).view(*x.shape[:-1], self.out_features)
        if rows.shape[0] <= self.max_kernel_rows:
            xf = rows.float().contiguous()
            outs = [quant_ops.linear(xf, p.weight) for p in self.parts]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            out = (out if self.bias is None else out.add_(self.bias)).to(x.dtype)
        else:
            weight = torch.cat([quant_ops.dequantize(p.weight) for p in self.parts]) if len(self.parts) > 1 \
                else quant_ops.dequantize(self.parts[0].weight)
            out = F.linear(rows.to(GEMM_DTYPE), weight.to(GEMM_DTYPE)).to(x.dtype)
            if self.bias is not None:
                out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _gpu_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The Triton kernel per part, each adding its slice of the bias and writing rows' dtype."""
        from tokenmill.kernels.gpu import qlinear

        outs, start = [], 0
        for p in self.parts:
            n = p.weight.out_features
            bias = None if self.bias is None else self.bias[start:start + n]
            outs.append(qlinear.linear(rows, p.weight, bias, rows.dtype))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        formats = ", ".join(p.weight.format_name for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, {formats}{' (GPU layout)' * self.on_gpu}"


class QuantizedEmbedding(nn.Module):
    """Dequantizes only the looked-up rows."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.packed = PackedMatrix(weight)
        self.dtype = dtype
        self.on_gpu = False

    @property
    def weight(self) -> QuantizedWeight | GpuWeight:
        return self.packed.weight

    def to_gpu(self, device: torch.device) -> None:
        self.packed = PackedMatrix(gpu_layout(self.weight).to(device))
        self.on_gpu = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.on_gpu:
            from tokenmill.kernels.gpu import qlinear
            rows = qlinear.dequantize(self.weight, ids)
        else:
            rows = quant_ops.dequantize(self.weight, ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, -1)
