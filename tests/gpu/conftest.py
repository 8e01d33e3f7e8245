"""The GPU path's tests run natively on a CUDA GPU, else under Triton's interpreter on CPU tensors (slow: small
shapes; tests/conftest.py sets TRITON_INTERPRET)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")
    from tokenmill.kernels.gpu import tensor_device
    return tensor_device()
