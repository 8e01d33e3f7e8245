"""Triton kernels of the GPU path (`device="cuda"`): quantized matmul over packed GGUF blocks, paged attention,
RMSNorm. They run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which
is how this CPU-only project tests them (tests/gpu).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter runs the kernels in NumPy on CPU tensors (read by Triton at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tensor_device() -> torch.device:
    """Where the GPU path keeps its tensors: the CUDA GPU, or the CPU when only the interpreter can run the kernels."""
    if not triton_installed():
        raise ValueError("device='cuda' needs Triton: pip install 'tokenmill[gpu]'")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    raise ValueError("device='cuda' needs a CUDA GPU and a CUDA build of torch (this torch sees none); "
                     "TRITON_INTERPRET=1 runs the GPU path's kernels on the CPU, slowly, for tests")


def available() -> bool:
    """Whether device="auto" picks the GPU path: a CUDA GPU and Triton (never the interpreter by itself)."""
    return triton_installed() and torch.cuda.is_available()
