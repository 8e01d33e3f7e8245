"""The fused step: a whole decoder stack in one native call, for decode, verify and prefill rows.

Why: at batch 1 a step of small ops spent about as long in per-op costs (a Python call, an allocation and an
OpenMP team start for each of ~300 ops) as in streaming the weights (BENCHMARKS.md, "fused decode step"). The
native step (kernels/csrc/decode_step.cpp) runs the same math per layer with barriers instead. It covers the
Llama family (packed weights, SwiGLU, optional Q/K/V and output biases, sliding windows) and Gemma 3 (QK-norm,
GeGLU, sandwich norms; its embedding scale and logit soft-cap stay in Python); models or steps it does not cover
(float weights, more rows than the kernels' limit) take the module path, which stays the reference. Prefill
chunks take the native step too: a chunk's rows attend as one run, faster than the module path's PyTorch SDPA
at every measured size (BENCHMARKS.md, prefill paths).
`TOKENMILL_FUSED_DECODE=0` turns it off (A/B measurements, tests).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.kernels import decode_step, layer_ops, native
from tokenmill.model.gemma3 import Gemma3DecoderLayer
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.llama import DecoderLayer, LlamaModel


def _linear(module: torch.nn.Module) -> decode_step.Linear | None:
    if not isinstance(module, QuantizedLinear) or len(module.parts) > decode_step.MAX_PARTS:
        return None
    return decode_step.Linear.of([p.weight for p in module.parts], module.bias)


class FusedDecoder:
    """Holds the ctypes view of the model's layers; `run` advances the residual stream through all of them."""

    def __init__(self, model: LlamaModel, kv: KVCache, layers: list[decode_step.DecodeLayer], max_rows: int) -> None:
        self.model, self.kv, self.max_rows = model, kv, max_rows
        self.layers = (decode_step.DecodeLayer * len(layers))(*layers)
        c = model.config
        attn = model.layers[0].self_attn
        self.dims = decode_step.Dims(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                                     kv.block_size, c.rms_norm_eps, attn.scale, layer_ops.kv_type(kv.k),
                                     native.ptr(kv.recent_of), kv.recent_blocks,
                                     int(c.hidden_act == "gelu_pytorch_tanh"))

    @classmethod
    def build(cls, model: LlamaModel, kv: KVCache) -> FusedDecoder | None:
        """None when the model has something the native step does not do."""
        c = model.config
        if (os.environ.get("TOKENMILL_FUSED_DECODE", "1") == "0" or not native.available()
                or kv.dtype not in layer_ops.CACHE_DTYPES or c.head_dim % 8
                or any(type(layer) not in (DecoderLayer, Gemma3DecoderLayer) for layer in model.layers)):
            return None
        layers, max_rows = [], float("inf")
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            linears = [_linear(m) for m in projections]
            if any(lin is None for lin in linears):
                return None
            max_rows = min(max_rows, *(m.max_kernel_rows for m in projections))
            cache = kv.layer(i)
            rotary = model.layer_rotary[i]
            window = c.layer_window(i) or 0
            layers.append(decode_step.DecodeLayer(
                layer.input_layernorm.weight.data_ptr(), _pre_mlp_norm(layer).weight.data_ptr(), *linears,
                *(native.ptr(t) for t in cache[:7]), native.ptr(cache.recent_k), native.ptr(cache.recent_v),
                rotary.cos.data_ptr(), rotary.sin.data_ptr(),
                kv.layout.group_of[i], window, *_gemma_norms(layer)))
        return cls(model, kv, layers, int(max_rows)) if max_rows > 0 else None

    def run(self, x: torch.Tensor, positions: torch.Tensor,
            groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """x [M, hidden] float32 in place; groups[g] = (block tables [M, max_blocks], seq_lens [M], slots [M]),
        all int64, as the runner's decode metadata (tables from the window's first block)."""
        arr = (decode_step.KVGroup * len(groups))(*(
            decode_step.KVGroup(t.data_ptr(), t.shape[1], lens.data_ptr(), slots.data_ptr())
            for t, lens, slots in groups))
        decode_step.decode_layers(self.layers, arr, self.dims, positions, x)


def _pre_mlp_norm(layer: DecoderLayer | Gemma3DecoderLayer) -> torch.nn.Module:
    """The norm of the MLP's input: Llama's post_attention_layernorm, Gemma 3's pre_feedforward_layernorm."""
    return layer.pre_feedforward_layernorm if isinstance(layer, Gemma3DecoderLayer) else layer.post_attention_layernorm


def _gemma_norms(layer: DecoderLayer | Gemma3DecoderLayer) -> tuple[int, int, int, int]:
    """Pointers to the q and k head norms and the attention and MLP output norms (0 where the layer has none)."""
    attn = layer.self_attn
    q_k = (attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()) if attn.qk_norm else (0, 0)
    if not isinstance(layer, Gemma3DecoderLayer):
        return (*q_k, 0, 0)
    return (*q_k, layer.post_attention_layernorm.weight.data_ptr(), layer.post_feedforward_layernorm.weight.data_ptr())
