"""A model seen through a quantization grid while it trains (quantization-aware training): every decoder linear's
weight is rounded to the grid in the forward pass, and the gradient passes to the float weight as if the rounding
were not there (the straight-through estimator), so training moves weights where their rounding costs least."""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from tokenmill.model.llama import LlamaModel
from tokenmill.quant.grid import Grid


class _StraightThrough(torch.nn.Module):
    """A weight as the grid rounds it, with the gradient of the unrounded one (straight-through estimator)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.grid.fake(weight.detach()) - weight).detach()


def fake_quantized(model: LlamaModel, grid: Grid) -> LlamaModel:
    """`model` with every decoder linear's weight seen through `grid`'s round-to-nearest."""
    for module in model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            parametrize.register_parametrization(module, "weight", _StraightThrough(grid))
    return model


def without_fake_quantization(model: LlamaModel) -> LlamaModel:
    """`model` with its float weights back as plain parameters (fake_quantized's inverse)."""
    for module in model.layers.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model
