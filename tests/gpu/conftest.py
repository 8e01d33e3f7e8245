"""The GPU path's tests run natively on a CUDA GPU, else under Triton's interpreter on CPU tensors (slow: small
shapes). Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports one."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")
    from tokenmill.kernels.gpu import tensor_device
    return tensor_device()
