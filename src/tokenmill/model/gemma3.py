"""Gemma 3: the Llama decoder with sandwich norms (each sublayer's input and output normalized) and token
embeddings scaled by sqrt(hidden_size).

Everything else is the shared layers, configured by ModelConfig: QK-norm, GeGLU, the attention scale from
query_pre_attn_scalar, sliding-window layers (5 of every 6) with a 10k RoPE base beside the global layers' 1M.
Norm weights are held as Gemma's effective multiplier (1 + w): GGUF files store it so already, and the HF
loader adds the 1.
"""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.cache.kv_cache import KVCache
from tokenmill.config import ModelConfig
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.paged_attention import AttentionMetadata
from tokenmill.model.layers.rotary import RotaryEmbedding
from tokenmill.model.llama import MLP, Attention, LlamaModel


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, rotary, kv, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(LlamaModel):
    layer_cls = Gemma3DecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)  # rounded to the dtype, as in HF
