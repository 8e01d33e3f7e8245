"""RMSNorm computed in float32 whatever the model dtype, as the reference implementation does."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels import layer_ops, native


class RMSNorm(nn.Module):
    on_gpu = False  # the GPU path's Triton kernel (model/placement.py)

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def to_gpu(self, device: torch.device) -> None:
        self.on_gpu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_gpu:
            from tokenmill.kernels.gpu import layer_ops as gpu_ops
            return gpu_ops.rms_norm(x, self.weight, self.eps)
        if native.enabled_for(x) and x.stride(-1) == 1:
            return layer_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
