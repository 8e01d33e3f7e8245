"""Python entry points of the quantized-linear kernels: y = x @ W^T + b and row dequantization.

`available()` says whether the native library runs here; without it the callers use QuantizedWeight's
plain-PyTorch dequantization (correct, much slower).
"""
from __future__ import annotations

import ctypes

import torch

from tokenmill.kernels.native import available, f16_flag, library, ptr
from tokenmill.quant.weights import QuantizedWeight

__all__ = ["QMatrix", "available", "dequantize", "kernel_layout", "linear"]
_p, _i = ctypes.c_void_p, ctypes.c_int
_FORMATS = {None: 0, "q4_k": 1, "q6_k": 2, "q5_0": 3}  # tm::Format


class QMatrix(ctypes.Structure):
    """Mirror of tm::QMatrix (csrc/quant_linear.h): a QuantizedWeight's tensors and format."""
    _fields_ = [("q", _p), ("scale", _p), ("min", _p), ("bits", _i), ("f16", _i), ("group", _i), ("N", _i), ("K", _i),
                ("tiled", _i), ("format", _i), ("qh", _p), ("super", _p)]

    @classmethod
    def of(cls, w: QuantizedWeight) -> QMatrix:
        return cls(w.qweight.data_ptr(), w.scales.data_ptr(), ptr(w.mins), w.bits, f16_flag(w.scales), w.group_size,
                   w.out_features, w.in_features, int(w.tiled), _FORMATS[w.kquant], ptr(w.qhigh), ptr(w.super_scales))


def kernel_layout(w: QuantizedWeight) -> QuantizedWeight:
    """The layout the model should hold: tiled where the native kernels run and the shape allows (2.1-3.2x
    faster products on SmolLM2's shapes, BENCHMARKS.md), else as is (PyTorch reads either)."""
    return w.tile() if available() and w.can_tile else w


def linear(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x @ W^T: x float32 [M, in] contiguous -> float32 [M, out]; x is quantized to int8 per 32 values."""
    out = torch.empty(x.shape[0], w.out_features, dtype=torch.float32)
    library().tm_linear(x.data_ptr(), x.shape[0], ctypes.byref(QMatrix.of(w)), out.data_ptr())
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
    lib.tm_dequantize(ctypes.byref(QMatrix.of(w)), ptr(rows), n, out.data_ptr())
    return out
