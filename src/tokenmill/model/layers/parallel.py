"""Row-parallel projections for tensor parallelism (model/sharding.py): each rank holds some input columns of
o_proj and down_proj, so its output is a partial sum; an all-reduce over the ranks (torch.distributed) makes the
full output, the same on every rank. The residual stream, norms and everything between stay replicated."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class RowParallel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).contiguous()
        dist.all_reduce(out)
        return out


def make_row_parallel(model: nn.Module) -> None:
    """Every decoder layer's o_proj and down_proj summed across ranks, in place."""
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj)
