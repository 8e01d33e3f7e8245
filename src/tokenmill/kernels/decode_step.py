"""Python entry point of the fused decode step (csrc/decode_step.cpp): ctypes mirrors of its structs.

`DecodeLayer`s are built once per model (model/fused_decode.py holds the weights they point into); a step
passes only its per-step arrays (positions, block tables, sequence lengths, slots).
"""
from __future__ import annotations

import ctypes

import torch

from tokenmill.kernels.native import library, ptr
from tokenmill.kernels.quant_ops import QMatrix
from tokenmill.quant.weights import QuantizedWeight

MAX_PARTS = 3
_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class Linear(ctypes.Structure):
    _fields_ = [("parts", QMatrix * MAX_PARTS), ("num_parts", _i), ("bias", _p)]

    @classmethod
    def of(cls, parts: list[QuantizedWeight], bias: torch.Tensor | None) -> Linear:
        if len(parts) > MAX_PARTS:
            raise ValueError(f"a fused projection has at most {MAX_PARTS} packed parts, got {len(parts)}")
        matrices = (QMatrix * MAX_PARTS)(*(QMatrix.of(w) for w in parts))
        return cls(matrices, len(parts), ptr(bias))


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_attention_norm", _p), ("qkv", Linear), ("o", Linear), ("gate_up", Linear),
                ("down", Linear), ("k_cache", _p), ("v_cache", _p), ("k_scale", _p), ("v_scale", _p), ("signs", _p),
                ("k_offset", _p), ("codes", _p), ("recent_k", _p), ("recent_v", _p),
                ("cos", _p), ("sin", _p), ("group", _i), ("window", _i),
                ("q_norm", _p), ("k_norm", _p), ("attn_out_norm", _p), ("mlp_out_norm", _p)]


class KVGroup(ctypes.Structure):
    _fields_ = [("block_tables", _p), ("max_blocks", _i), ("seq_lens", _p), ("slots", _p)]


class Dims(ctypes.Structure):
    _fields_ = [("hidden", _i), ("heads", _i), ("kv_heads", _i), ("head_dim", _i), ("intermediate", _i),
                ("block_size", _i), ("eps", _f), ("scale", _f), ("kv_type", _i), ("recent_of", _p),
                ("recent_blocks", _i), ("gelu", _i)]


def decode_layers(layers: ctypes.Array, groups: ctypes.Array, dims: Dims, positions: torch.Tensor,
                  x: torch.Tensor) -> None:
    """Runs every layer on x [M, hidden] float32 in place (the residual stream); positions int64 [M]."""
    library().tm_decode_layers(ctypes.byref(layers), len(layers), ctypes.byref(groups), ctypes.byref(dims),
                               x.shape[0], positions.data_ptr(), x.data_ptr())
