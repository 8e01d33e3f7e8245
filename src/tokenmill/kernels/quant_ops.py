"""Python entry points of the quantized-linear kernels: y = x @ W^T + b and row dequantization.

`available()` says whether the native library runs here; without it the callers use QuantizedWeight's
plain-PyTorch dequantization (correct, much slower).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.build import KernelBuildError, load_library
from tokenmill.quant.weights import QuantizedWeight

_p = ctypes.c_void_p
_i = ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = load_library()
    except KernelBuildError:
        return None
    lib.tm_linear_q4.argtypes = [_p, _i, _i, _p, _p, _p, _i, _i, _i, _p, _p]
    lib.tm_linear_q8.argtypes = [_p, _i, _i, _p, _p, _i, _i, _i, _p, _p]
    lib.tm_dequantize.argtypes = [_i, _p, _p, _p, _i, _i, _i, _p, ctypes.c_int64, _p]
    for fn in (lib.tm_linear_q4, lib.tm_linear_q8, lib.tm_dequantize):
        fn.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: float32 [M, in] contiguous -> float32 [M, out]; activations are quantized to int8 per 32-block."""
    lib = _lib()
    m, k = x.shape
    out = torch.empty(m, w.out_features, dtype=torch.float32)
    f16 = int(w.scales.dtype == torch.float16)
    if w.bits == 4:
        lib.tm_linear_q4(x.data_ptr(), m, k, w.qweight.data_ptr(), w.scales.data_ptr(), w.mins.data_ptr(), f16,
                         w.out_features, w.group_size, _ptr(bias), out.data_ptr())
    else:
        lib.tm_linear_q8(x.data_ptr(), m, k, w.qweight.data_ptr(), w.scales.data_ptr(), f16, w.out_features,
                         w.group_size, _ptr(bias), out.data_ptr())
    return out


def dequantize(w: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 [rows, in] (all rows when None), bit-identical to QuantizedWeight.dequantize."""
    lib = _lib()
    if lib is None:
        return w.dequantize(rows)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    n = w.out_features if rows is None else rows.numel()
    out = torch.empty(n, w.in_features, dtype=torch.float32)
    lib.tm_dequantize(w.bits, w.qweight.data_ptr(), w.scales.data_ptr(), _ptr(w.mins),
                      int(w.scales.dtype == torch.float16), w.in_features, w.group_size, _ptr(rows), n, out.data_ptr())
    return out
