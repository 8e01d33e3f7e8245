"""Tensor-parallel shards of a checkpoint (Megatron-style), made before any weight is repacked, so packed GGUF
blocks are sliced, never dequantized.

Rank r of N keeps:
- attention heads [r H/N, (r+1) H/N) and KV heads [r KV/N, (r+1) KV/N): the rows of q, k, v (and their biases) and
  the matching input columns of o_proj;
- one contiguous range of FFN channels: rows of gate and up, input columns of down. Ranges are cut at whole
  quantization blocks of the down projections (256 values for k-quants, 32 for Q4_0/Q4_1/Q8_0 and float weights),
  as evenly as that allows (Qwen2.5-1.5B's 8960 channels split 4608 + 4352 in two);
- every other tensor whole (embeddings, norms, LM head).
Each rank's o_proj and down_proj then give partial sums of the full outputs; RowParallel (layers/parallel.py) adds
them across ranks. An o_proj bias is kept by rank 0 only (zeros elsewhere), so the sum counts it once.
"""
from __future__ import annotations

import dataclasses
import re

import gguf
import torch

from tokenmill.errors import UnsupportedModelError
from tokenmill.model.loader.checkpoint import Checkpoint, Weight
from tokenmill.quant.packed import PackedTensor

_NAME = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int
    size: int


def shard_checkpoint(ckpt: Checkpoint, shard: Shard) -> Checkpoint:
    """This rank's part of `ckpt`, with the config of a model of its heads and channels."""
    c, n, r = ckpt.config, shard.size, shard.rank
    if c.num_kv_heads % n:
        raise ValueError(f"tensor_parallel_size={n} must divide the model's {c.num_kv_heads} KV heads "
                         f"(and {c.num_heads} attention heads)")
    heads, kv_heads, dim = c.num_heads // n, c.num_kv_heads // n, c.head_dim
    unit = max([_block_values(w) for name, w in ckpt.weights.items() if name.endswith("down_proj.weight")] + [32])
    if c.intermediate_size % unit or c.intermediate_size // unit < n or (heads * dim) % unit:
        raise ValueError(f"tensor_parallel_size={n}: the model's {c.intermediate_size} FFN channels and "
                         f"{heads * dim} attention columns per rank do not split at whole blocks of {unit}")
    blocks = c.intermediate_size // unit
    first = unit * (r * (blocks // n) + min(r, blocks % n))
    channels = unit * (blocks // n + (r < blocks % n))
    spans = {"q_proj": (r * heads * dim, heads * dim), "k_proj": (r * kv_heads * dim, kv_heads * dim),
             "v_proj": (r * kv_heads * dim, kv_heads * dim), "o_proj": (r * heads * dim, heads * dim),
             "gate_proj": (first, channels), "up_proj": (first, channels), "down_proj": (first, channels)}
    weights: dict[str, Weight] = {}
    for name, w in ckpt.weights.items():
        match = _NAME.search(name)
        if match is None:
            weights[name] = w
            continue
        projection, kind = match.group(1).rsplit(".", 1)[-1], match.group(2)
        start, length = spans[projection]
        if projection in ("o_proj", "down_proj"):  # input columns; a bias sums once, on rank 0
            weights[name] = _columns(w, start, length) if kind == "weight" else w if r == 0 else _zeros(w)
        else:
            weights[name] = _rows(w, start, length)
    config = dataclasses.replace(c, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=channels)
    return dataclasses.replace(ckpt, config=config, weights=weights)


def _block_values(w: Weight) -> int:
    return gguf.GGML_QUANT_SIZES[w.qtype][0] if isinstance(w, PackedTensor) and w.is_quantized else 1


def _zeros(w: Weight) -> torch.Tensor:
    return torch.zeros(w.shape) if isinstance(w, PackedTensor) else torch.zeros_like(_refuse_packed(w))


def _refuse_packed(w: Weight) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise UnsupportedModelError("tensor parallelism takes GGUF files and float checkpoints, not "
                                    "tokenmill-quantized ones: give the float checkpoint and --quantization")
    return w


def _rows(w: Weight, start: int, length: int) -> Weight:
    if isinstance(w, PackedTensor):
        return PackedTensor(w.data[start:start + length].copy(), w.qtype, (length, *w.shape[1:]))
    return _refuse_packed(w)[start:start + length].clone()


def _columns(w: Weight, start: int, length: int) -> Weight:
    if isinstance(w, PackedTensor):
        values = gguf.GGML_QUANT_SIZES[w.qtype][0]
        data = w.data.reshape(w.shape[0], -1)
        per_value = data.shape[1] / w.shape[1]  # bytes (quantized) or elements (float) per value
        cut = slice(int(start * per_value), int((start + length) * per_value))
        if w.is_quantized and (start % values or length % values):
            raise ValueError(f"columns {start}:{start + length} do not fall on {w.qtype.name} blocks of {values}")
        return PackedTensor(data[:, cut].copy(), w.qtype, (w.shape[0], length))
    return _refuse_packed(w)[:, start:start + length].clone()
