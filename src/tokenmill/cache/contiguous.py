"""A simple per-sequence KV cache: one preallocated [kv_heads, max_len, head_dim] buffer per layer.

The attention call goes through `attend`, so a paged cache can later replace this without the
model code changing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ContiguousKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> None:
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens whose K/V are stored (committed by `advance`)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Store this chunk's K/V after the cached ones and attend causally. q: [T, H, D] -> [T, H, D]."""
        start, t = self.length, q.shape[0]
        end = start + t
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} tokens")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        keys, values = self.k[layer, :, :end].unsqueeze(0), self.v[layer, :, :end].unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)
        if t == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # a chunk after cached tokens: query i sees keys up to start + i
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            causal = False
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
