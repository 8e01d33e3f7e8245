"""The Llama family (Llama 2/3, Mistral, SmolLM2, Qwen2): pre-norm decoder, GQA attention, gated MLP.

The layers also carry the knobs relatives need, read from ModelConfig: QKV/output biases (Qwen2), QK-norm,
an attention scale, GeGLU, sliding-window layers with their own RoPE base, final logit softcapping
(Gemma 3 adds only its sandwich-norm decoder layer and scaled embeddings, in gemma3.py).

Q/K/V and gate/up projections are fused into one matrix each at load time: one GEMM instead of
three (two) per layer, which matters when decoding is bound by per-call overhead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.cache.kv_cache import KVCache
from tokenmill.config import ModelConfig
from tokenmill.kernels import layer_ops, native
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.paged_attention import AttentionMetadata, paged_attention
from tokenmill.model.layers.rotary import RotaryEmbedding, rotate_half

_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Attention(nn.Module):
    observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None  # on the module path, sees (layer, q, k)
    # as attention gets them, after RoPE (a calibration's statistics: model/kv_smoothing.py)

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        if self.observer is not None:
            self.observer(self.layer_idx, q, k)
        out = paged_attention(q, k, v, kv.layer(self.layer_idx), meta, self.scale)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    on_gpu = False  # the GPU path's Triton kernel (model/placement.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def to_gpu(self, device: torch.device) -> None:
        self.on_gpu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.on_gpu:
            from tokenmill.kernels.gpu import layer_ops as gpu_ops
            return self.down_proj(gpu_ops.act_and_mul(gate_up, gelu=self.act is not F.silu))
        if native.enabled_for(gate_up) and gate_up.is_contiguous():
            return self.down_proj(layer_ops.act_and_mul(gate_up, gelu=self.act is not F.silu))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """`rotary` serves full-attention layers, `local_rotary` (if given) the sliding-window ones."""

    layer_cls: type[nn.Module] = DecoderLayer

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding,
                 local_rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.config = config
        # Built on the meta device and loaded later: an explicit weight skips the random init, whose meta kernel
        # imports torch._dynamo (a second of start-up).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self.layer_cls(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = rotary
        self.local_rotary = local_rotary
        self.layer_rotary = [local_rotary if local_rotary is not None and config.layer_window(i) else rotary
                             for i in range(config.num_layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def key_offsets(self, positions: int = 4096) -> torch.Tensor | None:
        """Per layer, the constant part of its keys [layers, kv_heads, head_dim]: the k bias as RoPE turns it,
        averaged over the first `positions` positions (slow RoPE pairs keep it, fast ones average it out); None
        without k biases. Compressed KV caches store keys minus it (cache/kv_cache.py): Qwen2's k biases reach
        hundreds in its first layers and would otherwise set every key's quantization step."""
        if not self.config.attention_bias:
            return None
        means = {id(r): (r.cos[:positions].float().mean(0), r.sin[:positions].float().mean(0))
                 for r in self.layer_rotary}  # layers share their RoPE tables
        offsets = []
        for attn, rotary in zip((layer.self_attn for layer in self.layers), self.layer_rotary):
            q_size, kv_size, _ = attn.split
            bias = attn.qkv_proj.bias.detach().float()[q_size:q_size + kv_size].view(attn.num_kv_heads, -1)
            cos, sin = means[id(rotary)]
            offsets.append(bias * cos + rotate_half(bias) * sin)
        return torch.stack(offsets)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: Sequence[AttentionMetadata],
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Run a step's flattened tokens; float32 logits of the rows in `logits_indices` (all rows if None).

        `meta[g]` describes KV group g (kv.layout); each layer gets its group's."""
        x = self.hidden_states(input_ids, positions, kv, meta)
        return self.logits(x if logits_indices is None else x[logits_indices])

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                      meta: Sequence[AttentionMetadata]) -> torch.Tensor:
        """The last layer's output for a step's flattened tokens (before the final norm)."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.layer_rotary[i], kv, meta[kv.layout.group_of[i]])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states (before the last norm)."""
        logits = self.lm_head(self.norm(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)
