"""The loaded native kernel library (None where it cannot run), and when callers should use it.

`TOKENMILL_NATIVE_KERNELS=0` turns every native kernel off (plain PyTorch everywhere), for A/B measurements
and for tests that compare both paths.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from tokenmill.kernels.build import KernelBuildError, load_library

logger = logging.getLogger("tokenmill.kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("TOKENMILL_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        return load_library()
    except KernelBuildError as exc:
        # BENCHMARKS.md, "Threads on a loaded machine": 8 tokens took ~80x longer without the kernels
        logger.warning("native kernels unavailable: using plain PyTorch, which decodes ~80x slower or worse: %s",
                       exc)
        return None


def available() -> bool:
    return library() is not None


def enabled_for(x: torch.Tensor) -> bool:
    """The float kernels take float32 CPU tensors; other dtypes stay on PyTorch's own kernels, and so does a
    tensor autograd is recording (the kernels carry no gradients: training, compress/distill.py)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and available())


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def f16_flag(t: torch.Tensor) -> int:
    """The kernels' `f16` argument: 1 when t (a packed weight's scales) is float16, 0 for float32."""
    return int(t.dtype == torch.float16)
