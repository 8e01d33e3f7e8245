"""GPTQ (Frantar et al. 2022): quantize a linear weight one input column at a time, and after each column spread
its rounding error over the not-yet-quantized columns, weighted by the inverse of the inputs' Gram matrix
H = X^T X, so the layer's output on the calibration inputs moves as little as possible.

Groups are contiguous (no activation reordering), so the result is an ordinary QuantizedWeight: each group's
scale and min are fitted when its first column is reached, on the already-updated weights. The Gram matrices
come from the float model (all layers calibrated in one pass), and linears that share an input (q/k/v,
gate/up) are quantized together, as one matrix.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from tokenmill.compress.awq import scale_groups
from tokenmill.compress.calibration import LinearInputs
from tokenmill.config import ModelConfig
from tokenmill.quant.grid import Grid
from tokenmill.quant.weights import QuantizedWeight, encode, fit_grid, pack_nibbles

DAMP = 0.01  # fraction of H's mean diagonal added to it, for a stable inverse
BLOCK = 128  # columns whose updates are applied lazily together


def gptq(weights: dict[str, torch.Tensor], config: ModelConfig, inputs: dict[str, LinearInputs], grid: Grid,
         progress: bool = False) -> dict[str, QuantizedWeight]:
    """Quantized weights of every decoder linear (checkpoint names); other tensors are not returned."""
    out: dict[str, QuantizedWeight] = {}
    for group in tqdm(scale_groups(config), desc="gptq", unit="group", disable=not progress):
        mats = [weights[name] for name in group.linears]
        packed = gptq_quantize(torch.cat(mats), inputs[group.inputs].gram, grid)
        start = 0
        for name, w in zip(group.linears, mats):
            out[name] = _rows(packed, start, start + w.shape[0])
            start += w.shape[0]
    return out


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, grid: Grid) -> QuantizedWeight:
    rows, cols = w.shape
    group = grid.group(cols)
    w = w.float().clone()
    hinv = _inverse_factor(gram, w)
    codes = torch.empty(rows, cols)
    scales = torch.empty(rows, cols // group, dtype=grid.scale_dtype)
    mins = torch.empty_like(scales) if grid.bits == 4 else None
    block = max(BLOCK // group, 1) * group  # a group never straddles two blocks
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb, hb = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        errors = torch.empty_like(wb)
        for i in range(b1 - b0):
            if (b0 + i) % group == 0:
                g = (b0 + i) // group
                scale, low = fit_grid(wb[:, i:i + group], grid.bits, 1.0, grid.scale_dtype)
                scales[:, g] = scale
                if mins is not None:
                    mins[:, g] = low
                s, m = scale.float(), None if low is None else low.float()
            q = encode(wb[:, i], s, m, grid.bits)
            codes[:, b0 + i] = q
            err = (wb[:, i] - (q * s if m is None else q * s + m)) / hb[i, i]
            wb[:, i:].sub_(err[:, None] * hb[i, i:][None, :])
            errors[:, i] = err
        w[:, b1:].sub_(errors @ hinv[b0:b1, b1:])
    qweight = codes.to(torch.int8) if grid.bits == 8 else pack_nibbles(codes)
    return QuantizedWeight(grid.bits, qweight, scales, mins, group)


def _inverse_factor(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1; inputs that were always zero get their weights zeroed."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def _rows(w: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    mins = None if w.mins is None else w.mins[start:stop].clone()
    return QuantizedWeight(w.bits, w.qweight[start:stop].clone(), w.scales[start:stop].clone(), mins, w.group_size)
