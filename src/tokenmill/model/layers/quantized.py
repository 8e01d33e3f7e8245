"""Layers over a QuantizedWeight: drop-in replacements for nn.Linear and nn.Embedding, chosen at load time
so the model code does not change.

QuantizedLinear picks its kernel per call from the number of rows: up to `max_kernel_rows` the native
int8-dot kernel streams the packed weight once (decode and small batches are bandwidth-bound); above it the
weight is dequantized to floats for one float GEMM, whose cost the many rows amortize (prefill).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import quant_ops
from tokenmill.quant.weights import QuantizedWeight

DEFAULT_MAX_KERNEL_ROWS = 32


class _QuantizedParams(nn.Module):
    """Holds a QuantizedWeight's tensors as buffers, so they show up in state_dict and memory accounting."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("mins", weight.mins)
        self.weight = weight


class QuantizedLinear(_QuantizedParams):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                 max_kernel_rows: int = DEFAULT_MAX_KERNEL_ROWS) -> None:
        super().__init__(weight)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.max_kernel_rows = max_kernel_rows if quant_ops.available() else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.max_kernel_rows:
            out = quant_ops.linear(rows.float().contiguous(), self.weight, self.bias).to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(rows, quant_ops.dequantize(self.weight).to(x.dtype), bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        w = self.weight
        return f"in={self.in_features}, out={self.out_features}, int{w.bits}, group={w.group_size}"


class QuantizedEmbedding(_QuantizedParams):
    """Dequantizes only the looked-up rows."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__(weight)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return quant_ops.dequantize(self.weight, ids.reshape(-1)).to(self.dtype).view(*ids.shape, -1)
