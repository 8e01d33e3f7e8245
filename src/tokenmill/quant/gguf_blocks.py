"""GGUF block types -> QuantizedWeight, exactly: the repacked weight dequantizes to the same float32 values
as the `gguf` package's reference dequantization, bit for bit.

Q4_0 (d, 16 nibble bytes; w = d * (q - 8)) becomes int4 with min = -8d, Q4_1 (d, m, nibbles) int4 as is,
Q8_0 (d, 32 int8) int8 with group 32; all keep their float16 scales. Other types have no exact mapping
yet and are dequantized to floats by the model builder (`tokenmill info` lists which).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from tokenmill.model.loader.gguf import PackedTensor
from tokenmill.quant.weights import BLOCK, QuantizedWeight

NATIVE_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0})


def repack(t: PackedTensor) -> QuantizedWeight:
    if t.qtype not in NATIVE_TYPES or len(t.shape) != 2:
        raise ValueError(f"GGUF {t.qtype.name} tensor of shape {t.shape} has no exact packed mapping")
    rows, cols = t.shape
    blocks = np.ascontiguousarray(t.data).reshape(rows, cols // BLOCK, -1)
    scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16).reshape(rows, -1))
    if t.qtype == Q.Q8_0:
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, cols))
        return QuantizedWeight(8, q, scales, None, BLOCK)
    if t.qtype == Q.Q4_1:
        mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).reshape(rows, -1))
        nibbles = blocks[..., 4:]
    else:
        mins = scales * -8  # exact: a power-of-two multiple of a float16
        nibbles = blocks[..., 2:]
    return QuantizedWeight(4, torch.from_numpy(nibbles.reshape(rows, cols // 2).copy()), scales, mins, BLOCK)
