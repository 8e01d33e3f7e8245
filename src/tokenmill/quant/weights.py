"""QuantizedWeight: a [out, in] matrix kept in 4- or 8-bit blocks along `in`, the one format every
quantized path shares (GGUF repacking, round-to-nearest and calibrated quantization, the native kernels).

int4: w = scale * q + min with q in [0, 15] (asymmetric; symmetric int4 is min = -8 * scale). The nibbles of
each 32-block are ordered as in GGUF's Q4_0/Q4_1 (byte j holds q[j] low, q[j + 16] high), so those GGUF
types repack by copying bytes. int8: w = scale * q with q in [-127, 127] (GGUF Q8_0 is group 32; Q6_K's
16-groups are the one group size below 32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # elements per nibble-packing block; group sizes are multiples of it
TILE_ROWS = 8  # rows interleaved in the tiled layout
CHUNK_BYTES = 4  # bytes of one row that sit together in the tiled layout


@dataclass
class QuantizedWeight:
    bits: int  # 4 or 8
    qweight: torch.Tensor  # int4: uint8 [out, in // 2]; int8: int8 [out, in]
    scales: torch.Tensor  # float16 or float32 [out, in // group_size]
    mins: torch.Tensor | None  # int4 only: same shape and dtype as scales
    group_size: int
    tiled: bool = False  # the native kernels' layout (see tile()); shapes are the same in both layouts

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if (self.group_size % BLOCK and (self.bits, self.group_size) != (8, 16)) or self.in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} must be a multiple of {BLOCK} (or 16 for int8) dividing "
                             f"{self.in_features}")
        if (self.mins is None) != (self.bits == 8):
            raise ValueError("int4 weights need mins; int8 weights have none")
        if self.tiled and (self.group_size != BLOCK or self.out_features % TILE_ROWS):
            raise ValueError(f"a tiled weight has group_size {BLOCK} and a multiple of {TILE_ROWS} rows")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    @property
    def can_tile(self) -> bool:
        return self.out_features % TILE_ROWS == 0 and self.group_size % BLOCK == 0

    def tile(self) -> QuantizedWeight:
        """The native kernels' layout (kernels/csrc/quant_linear.cpp): rows interleaved 8 at a time in chunks of
        4 elements per 32-block, and one scale (and min) per 32-block, the 8 rows' values side by side. The
        values are unchanged: dequantize() gives the same floats in either layout."""
        if self.tiled:
            return self
        if not self.can_tile:
            raise ValueError(f"cannot tile a {self.shape} weight with group_size {self.group_size}")
        n, tiles, blocks, chunks = self._tile_shape()
        q = self.qweight.view(tiles, TILE_ROWS, blocks, chunks, CHUNK_BYTES).permute(0, 2, 3, 1, 4)

        def per_block(t: torch.Tensor) -> torch.Tensor:
            t = t.repeat_interleave(self.group_size // BLOCK, dim=1)
            return t.view(tiles, TILE_ROWS, blocks).transpose(1, 2).reshape(n, blocks)

        return QuantizedWeight(self.bits, q.reshape(self.qweight.shape), per_block(self.scales),
                               None if self.mins is None else per_block(self.mins), BLOCK, tiled=True)

    def untile(self) -> QuantizedWeight:
        """The row layout (group size 32 when it was tiled)."""
        if not self.tiled:
            return self
        n, tiles, blocks, chunks = self._tile_shape()
        q = self.qweight.view(tiles, blocks, chunks, TILE_ROWS, CHUNK_BYTES).permute(0, 3, 1, 2, 4)

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.view(tiles, blocks, TILE_ROWS).transpose(1, 2).reshape(n, blocks)

        return QuantizedWeight(self.bits, q.reshape(self.qweight.shape), per_row(self.scales),
                               None if self.mins is None else per_row(self.mins), BLOCK)

    def _tile_shape(self) -> tuple[int, int, int, int]:
        """Rows, tiles of 8 rows, 32-blocks per row, and 4-byte chunks per row's 32-block."""
        n, k = self.shape
        return n, n // TILE_ROWS, k // BLOCK, BLOCK * self.bits // 8 // CHUNK_BYTES

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Integer values q as int16 [rows, in] (all rows when `rows` is None)."""
        if self.tiled:
            return self.untile().codes(rows)
        q = self.qweight if rows is None else self.qweight[rows]
        if self.bits == 8:
            return q.to(torch.int16)
        blocks = q.view(q.shape[0], -1, BLOCK // 2)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(q.shape[0], -1).to(torch.int16)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 values, in plain PyTorch: the reference the native kernels are tested against."""
        if self.tiled:
            return self.untile().dequantize(rows)
        q = self.codes(rows).float().view(-1, self.in_features // self.group_size, self.group_size)
        scales = (self.scales if rows is None else self.scales[rows]).float()[..., None]
        w = scales * q
        if self.mins is not None:
            w = w + (self.mins if rows is None else self.mins[rows]).float()[..., None]
        return w.reshape(q.shape[0], self.in_features)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack along the output dim (fused QKV, gate/up); the parts must share one format."""
        first = parts[0]
        if any((p.bits, p.group_size, p.scales.dtype, p.in_features, p.tiled) != (first.bits, first.group_size,
               first.scales.dtype, first.in_features, first.tiled) for p in parts):
            raise ValueError("cannot fuse quantized weights of different formats")
        mins = None if first.mins is None else torch.cat([p.mins for p in parts])
        return QuantizedWeight(first.bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                               mins, first.group_size, first.tiled)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers in [0, 15] -> uint8 [out, in // 2] in GGUF's per-block nibble order."""
    blocks = q.to(torch.uint8).view(q.shape[0], -1, BLOCK)
    return (blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)).reshape(q.shape[0], -1)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None, *, clip: torch.Tensor | float = 1.0,
                 scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest: int8 symmetric (per output channel unless group_size), int4 asymmetric per group.

    clip: ratio (scalar or [out, groups]) of each group's absolute maximum that the grid covers; values beyond
    are clamped (calibrated methods search it). Scales and mins are rounded to `scale_dtype` before the codes
    are chosen, so float32 adds no error beyond the rounding of q and float16 halves their storage.
    """
    q, scales, mins = _round_to_grid(w, bits, group_size, clip, scale_dtype)
    out, inp = w.shape
    group = inp // scales.shape[1]
    if bits == 8:
        return QuantizedWeight(8, q.to(torch.int8).view(out, inp), scales, None, group)
    return QuantizedWeight(4, pack_nibbles(q.view(out, inp)), scales, mins, group)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, *, clip: torch.Tensor | float = 1.0,
                  scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What quantize_rtn(...).dequantize() returns, without packing: the inner loop of calibrated searches."""
    q, scales, mins = _round_to_grid(w, bits, group_size, clip, scale_dtype)
    g = q * scales.float()[..., None]
    if mins is not None:
        g = g + mins.float()[..., None]
    return g.view(w.shape)


def _round_to_grid(w: torch.Tensor, bits: int, group_size: int | None, clip: torch.Tensor | float,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes as float [out, groups, group], scales and mins (int4 only) as `scale_dtype` [out, groups]."""
    w = w.float()
    out, inp = w.shape
    group = group_size or (inp if bits == 8 else BLOCK)
    if inp % group:
        raise ValueError(f"group_size {group} does not divide in_features {inp}")
    g = w.view(out, inp // group, group)
    scales, mins = fit_grid(g, bits, clip, scale_dtype)
    return encode(g, scales[..., None], None if mins is None else mins[..., None], bits), scales, mins


def fit_grid(g: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0,
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and int4 min) of each group along the last dim of `g`, covering `clip` times its absolute max."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    limit = g.abs().amax(-1) * clip
    if bits == 8:
        return (limit / 127).to(scale_dtype), None
    lo, hi = torch.maximum(g.amin(-1), -limit), torch.minimum(g.amax(-1), limit)
    return ((hi - lo) / 15).to(scale_dtype), lo.to(scale_dtype)


def encode(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Nearest codes (as floats) of `w` on the grid scale * q (+ min); scales and mins broadcast against w."""
    s = scales.float()
    s = torch.where(s == 0, 1, s)
    if bits == 8:
        return torch.round(w / s).clamp_(-127, 127)
    return torch.round((w - mins.float()) / s).clamp_(0, 15)
