"""Depth pruning by measured importance: a decoder layer whose output is nearly its input (block influence,
1 - cos(x_in, x_out) averaged over tokens; Men et al., 2024, "ShortGPT") changes the model least when dropped.
Measured on calibration text with the teacher itself; the layers of least influence go, the rest are renumbered."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tokenmill.compress.perplexity import Scorer
from tokenmill.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.")


def block_influence(model: torch.nn.Module, score: Scorer, ids: Sequence[int], seq_len: int = 512) -> torch.Tensor:
    """Per decoder layer, 1 - the mean cosine similarity of its input and output hidden states, over `ids` in
    chunks of `seq_len` scored by `score` (which runs `model`)."""
    sums = torch.zeros(len(model.layers), dtype=torch.float64)
    count = 0

    def hook(index: int):
        def record(module, args, output) -> None:
            sums[index] += (1 - F.cosine_similarity(args[0].float(), output.float(), dim=-1)).sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start:start + seq_len]
            score(chunk)
            count += len(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).float()


def least_influential(influence: torch.Tensor, num_drop: int) -> list[int]:
    """The `num_drop` layers of least influence, ascending by index; never the first or the last layer (they
    turn embeddings into the residual stream and it into logits: dropping them costs far more than BI shows)."""
    if not 0 <= num_drop <= len(influence) - 2:
        raise ValueError(f"can drop 0 to {len(influence) - 2} of {len(influence)} layers, not {num_drop}")
    middle = influence[1:-1]
    return sorted((middle.argsort()[:num_drop] + 1).tolist())


def drop_layers(weights: dict[str, torch.Tensor], config: ModelConfig, drop: Sequence[int]
                ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Checkpoint-named weights and config without layers `drop`; the others keep their order, renumbered."""
    if config.layer_types is not None or config.sliding_window is not None:
        raise ValueError("depth pruning covers models whose layers are all alike (no per-layer sliding windows)")
    keep = [i for i in range(config.num_layers) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, tensor in weights.items():
        match = _LAYER.match(name)
        if match is None:
            out[name] = tensor
        elif int(match.group(1)) in new_index:
            out[f"layers.{new_index[int(match.group(1))]}.{name[match.end():]}"] = tensor
    return out, dataclasses.replace(config, num_layers=len(keep))


def parameter_count(weights: dict[str, torch.Tensor], config: ModelConfig) -> int:
    """Parameters as the model holds them (a tied LM head counted once)."""
    return sum(t.numel() for name, t in weights.items()
               if not (config.tie_word_embeddings and name == "lm_head.weight"))
