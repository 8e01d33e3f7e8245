"""GGUF block types -> QuantizedWeight, exactly: the repacked weight dequantizes to the same float32 values
as the `gguf` package's reference dequantization, bit for bit.

- Q4_0 (w = d * (q - 8)) -> int4, min = -8d; Q4_1 (w = d * q + m) -> int4; both float16 scales, group 32.
- Q8_0 (w = d * q) -> int8 group 32; Q5_0 (w = d * (q - 16), 5-bit q) -> its own tiled format at 5.5 bits per
  weight (expanded, where rows are not a multiple of 8: int8 codes q - 16, group 32).
- Q4_K (256-blocks of eight 32-groups, w = (d * sc) * q - (dmin * m)) and Q6_K (sixteen 16-groups,
  w = (d * sc) * (q - 32)) -> the k-quant formats at the file's size, tiled; the rare matrix whose rows are not
  a multiple of 8 gets their expansion (int4 group 32 with float32 scale d * sc and min -(dmin * m); int8
  codes q - 32, group 16): products of a float16 and a small integer are exact in float32.
Other types (Q2_K, Q3_K, Q5_1, Q5_K, ...) are dequantized to floats by the model builder (`tokenmill
info` lists which).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

from tokenmill.quant.packed import PackedTensor
from tokenmill.quant.weights import BLOCK, TILE_ROWS, QuantizedWeight, interleave_rows, pack_nibbles


def repack(t: PackedTensor) -> QuantizedWeight:
    if t.qtype not in NATIVE_TYPES or len(t.shape) != 2:
        raise ValueError(f"GGUF {t.qtype.name} tensor of shape {t.shape} has no exact packed mapping")
    return _REPACKERS[t.qtype](np.ascontiguousarray(t.data), *t.shape)


def _legacy(data: np.ndarray, rows: int, cols: int, qtype: Q) -> QuantizedWeight:
    """Q4_0, Q4_1, Q8_0: 32-element blocks led by a float16 scale."""
    blocks = data.reshape(rows, cols // BLOCK, -1)
    scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16).reshape(rows, -1))
    if qtype == Q.Q8_0:
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, cols))
        return QuantizedWeight(8, q, scales, None, BLOCK)
    if qtype == Q.Q4_1:
        mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).reshape(rows, -1))
        nibbles = blocks[..., 4:]
    else:
        mins = scales * -8  # exact: a power-of-two multiple of a float16
        nibbles = blocks[..., 2:]
    return QuantizedWeight(4, torch.from_numpy(nibbles.reshape(rows, cols // 2).copy()), scales, mins, BLOCK)


def _q5_0(data: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    blocks = data.reshape(rows * cols // BLOCK, -1)
    scales = blocks[:, 0:2].copy().view(np.float16).reshape(rows, -1)
    high = ((blocks[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    low = blocks[:, 6:, None] >> np.array([0, 4], dtype=np.uint8)
    low = (low & 0x0F).transpose(0, 2, 1).reshape(rows, cols)
    if rows % TILE_ROWS:
        q = (low | high.reshape(rows, cols) << 4).astype(np.int8) - np.int8(16)
        return QuantizedWeight(8, torch.from_numpy(q), torch.from_numpy(scales), None, BLOCK)
    nb = cols // BLOCK
    # element 16 * half + 4c + j of a block: its high bit goes to byte (row, j), bit 2c + half
    shifts = np.arange(8, dtype=np.uint8).reshape(4, 2).T.reshape(2, 4, 1)  # [half, c, j]
    qhigh = (high.reshape(rows, nb, 2, 4, 4) << shifts).sum(axis=(2, 3), dtype=np.uint8)  # [row, block, j]
    qhigh = qhigh.reshape(rows // TILE_ROWS, TILE_ROWS, nb, 4).transpose(0, 2, 1, 3)
    nibbles = interleave_rows(pack_nibbles(torch.from_numpy(low)), nb)
    return QuantizedWeight(5, nibbles, torch.from_numpy(_by_tile(scales).reshape(rows, -1)), None, BLOCK, tiled=True,
                           kquant="q5_0", qhigh=torch.from_numpy(np.ascontiguousarray(qhigh).reshape(rows, -1)))


def _q4_k(data: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    blocks = data.reshape(rows * cols // 256, -1)
    d, dmin = (blocks[:, i:i + 2].copy().view(np.float16).reshape(rows, -1) for i in (0, 2))
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    nibbles = pack_nibbles(torch.from_numpy((qs & 0x0F).reshape(rows, cols)))  # 32-groups: low nibbles, then high
    if rows % TILE_ROWS:
        scales = np.repeat(d.astype(np.float32), 8, axis=1) * sc.reshape(rows, -1).astype(np.float32)
        mins = -(np.repeat(dmin.astype(np.float32), 8, axis=1) * m.reshape(rows, -1).astype(np.float32))
        return QuantizedWeight(4, nibbles, torch.from_numpy(scales), torch.from_numpy(mins), BLOCK)
    nb = cols // BLOCK
    sc, m = (_by_tile(c.reshape(rows, nb)) for c in (sc, m))  # [tiles, block, row]
    high = (sc >> 4) | (m >> 4) << 2
    codes = np.concatenate([(sc & 15) | (m & 15) << 4, high[..., 0::2] | high[..., 1::2] << 4], axis=-1)
    super_scales = np.stack([_by_tile(d), _by_tile(dmin)], axis=2)  # [tiles, super-block, (d, dmin), row]
    return QuantizedWeight(4, interleave_rows(nibbles, nb), torch.from_numpy(codes.reshape(rows, -1)), None, BLOCK,
                           tiled=True, kquant="q4_k", super_scales=torch.from_numpy(super_scales.reshape(rows, -1)))


def _q6_k(data: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    blocks = data.reshape(rows * cols // 256, -1)
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = blocks[:, 192:208].copy().view(np.int8).reshape(rows, -1)
    d = blocks[:, 208:210].copy().view(np.float16).reshape(rows, -1)
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    low, high = low.reshape(rows, cols), high.reshape(rows, cols)
    if rows % TILE_ROWS:
        q = torch.from_numpy((low | high << 4).astype(np.int8) - np.int8(32))
        scales = np.repeat(d.astype(np.float32), 16, axis=1) * sc.astype(np.float32)
        return QuantizedWeight(8, q, torch.from_numpy(scales), None, 16)
    nb = cols // BLOCK
    # element 16 * half + 4 * (2v + h) + j of a block: its high bits go to byte (v, row, j), bits 4h + 2 * half
    shifts = np.array([[0, 4], [2, 6]], dtype=np.uint8).reshape(2, 1, 2, 1)  # [half, v, h, j]
    qhigh = (high.reshape(rows, nb, 2, 2, 2, 4) << shifts).sum(axis=(2, 4), dtype=np.uint8)  # [row, block, v, j]
    qhigh = qhigh.reshape(rows // TILE_ROWS, TILE_ROWS, nb, 2, 4).transpose(0, 2, 3, 1, 4)
    scales = _by_tile(sc, parts=2)  # [tiles, block, (first 16, last 16) x row]
    nibbles = interleave_rows(pack_nibbles(torch.from_numpy(low)), nb)
    return QuantizedWeight(6, nibbles, torch.from_numpy(scales.reshape(rows, -1)), None, 16, tiled=True,
                           kquant="q6_k", qhigh=torch.from_numpy(qhigh.reshape(rows, -1)),
                           super_scales=torch.from_numpy(_by_tile(d).reshape(rows, -1)))


def _by_tile(a: np.ndarray, parts: int = 1) -> np.ndarray:
    """Per-row values [rows, n * parts] (parts: several values per block side by side) as [tiles, n, parts * 8]:
    the 8 rows of a tile next to each other for each block (and part)."""
    rows = a.shape[0]
    t = a.reshape(rows // TILE_ROWS, TILE_ROWS, -1, parts).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(t.reshape(rows // TILE_ROWS, -1, parts * TILE_ROWS))


_REPACKERS = {
    **{qtype: functools.partial(_legacy, qtype=qtype) for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0)},
    Q.Q5_0: _q5_0,
    Q.Q4_K: _q4_k,
    Q.Q6_K: _q6_k,
}
NATIVE_TYPES = frozenset(_REPACKERS)
