"""Rotary position embeddings (rotate-half layout), with linear and Llama 3 frequency scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.config import RopeScaling
from tokenmill.kernels import layer_ops, native


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, freq_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair rotation speeds; `freq_factors` is GGUF's `rope_freqs` tensor (Llama 3 scaling baked in)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:
        return inv_freq / freq_factors.float()
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"unknown rope scaling {scaling.kind!r}")


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Slow down low frequencies by `factor`, keep high ones, blend in between (Llama 3.1 recipe)."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables for every position up to the model's context length."""

    on_gpu = False  # the GPU path's Triton kernel (model/placement.py)

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def to_gpu(self, device: torch.device) -> None:
        self.on_gpu = True

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, dim], k: [T, kv_heads, dim], positions: [T]. The native and GPU kernels rotate in place."""
        if self.on_gpu and q.stride(-1) == 1 and k.stride(-1) == 1:
            from tokenmill.kernels.gpu import layer_ops as gpu_ops
            gpu_ops.rotary_(positions, q, k, self.cos, self.sin)
            return q, k
        if native.enabled_for(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            layer_ops.rotary_(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dimension: RoPE's quarter turn."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
