"""Calibration statistics: run a float model over text and record, with forward hooks on its nn.Linear modules,
what each one sees as input. Both calibrated methods need only two sums over all tokens: the mean |x| of each
input channel (AWQ's saliency) and the Gram matrix X^T X (the quadratic form of a layer's output error, which
AWQ's searches and GPTQ's updates minimize)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from tokenmill.compress.perplexity import Scorer


@dataclass
class LinearInputs:
    abs_mean: torch.Tensor  # [in] mean |x| per input channel
    gram: torch.Tensor  # [in, in] sum over tokens of x x^T (float32)
    num_tokens: int

    def error(self, delta: torch.Tensor) -> torch.Tensor:
        """Summed squared output error over the calibration tokens of a weight change `delta` [out, in]."""
        return ((delta @ self.gram) * delta).sum()


def record_linear_inputs(model: nn.Module, score: Scorer, ids: Sequence[int], seq_len: int = 512,
                         skip: tuple[str, ...] = ("lm_head",), progress: bool = False) -> dict[str, LinearInputs]:
    """Score `ids` in independent chunks of `seq_len` tokens; statistics keyed by the model's module names."""
    if len(ids) < 2:
        raise ValueError(f"calibration needs at least 2 tokens, got {len(ids)}")
    abs_sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if name in grams:
                abs_sums[name] += x.abs().sum(0)
                grams[name].addmm_(x.T, x)
            else:
                abs_sums[name], grams[name] = x.abs().sum(0), x.T @ x
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name not in skip]
    try:
        chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        for chunk in tqdm(chunks, desc="calibrating", unit="chunk", disable=not progress):
            score(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: LinearInputs(abs_sums[name] / len(ids), grams[name], len(ids)) for name in grams}
