"""Python entry points of the quantized-linear kernels: y = x @ W^T + b and row dequantization.

`available()` says whether the native library runs here; without it the callers use QuantizedWeight's
plain-PyTorch dequantization (correct, much slower).
"""
from __future__ import annotations

import torch

from tokenmill.kernels.native import available, f16_flag, library, ptr
from tokenmill.quant.weights import QuantizedWeight

__all__ = ["available", "dequantize", "linear"]


def linear(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x @ W^T: x float32 [M, in] contiguous -> float32 [M, out]; x is quantized to int8 per 32 values."""
    lib = library()
    m, k = x.shape
    out = torch.empty(m, w.out_features, dtype=torch.float32)
    lib.tm_linear(x.data_ptr(), m, k, w.bits, w.qweight.data_ptr(), w.scales.data_ptr(), ptr(w.mins),
                  f16_flag(w.scales), w.out_features, w.group_size, out.data_ptr())
    return out


def dequantize(w: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 [rows, in] (all rows when None), bit-identical to QuantizedWeight.dequantize."""
    lib = library()
    if lib is None:
        return w.dequantize(rows)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    n = w.out_features if rows is None else rows.numel()
    out = torch.empty(n, w.in_features, dtype=torch.float32)
    lib.tm_dequantize(w.bits, w.qweight.data_ptr(), w.scales.data_ptr(), ptr(w.mins),
                      f16_flag(w.scales), w.in_features, w.group_size, ptr(rows), n, out.data_ptr())
    return out
