"""QuantizedWeight: a [out, in] matrix kept in 4- or 8-bit blocks along `in`, the one format every
quantized path shares (GGUF repacking, round-to-nearest and calibrated quantization, the native kernels).

int4: w = scale * q + min with q in [0, 15] (asymmetric; symmetric int4 is min = -8 * scale). The nibbles of
each 32-block are ordered as in GGUF's Q4_0/Q4_1 (byte j holds q[j] low, q[j + 16] high), so those GGUF
types repack by copying bytes. int8: w = scale * q with q in [-127, 127] (GGUF Q8_0 is group 32; 16-groups are
the one group size below 32).

GGUF's Q4_K and Q6_K (integer scale codes under a float16 scale per 256 values) and Q5_0 (5-bit codes) are held
in their own formats (`kquant`), at the file's bits per weight, always tiled (kernels/csrc/tiled_matmul.cpp has
the byte layout). untile() expands one to the plain format with float32 scales, exactly (a float16 times a 6- or
8-bit integer is exact in float32): the reference the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # elements per nibble-packing block; group sizes are multiples of it
TILE_ROWS = 8  # rows interleaved in the tiled layout
CHUNK_BYTES = 4  # bytes of one row that sit together in the tiled layout
SUPER_BLOCK = 256  # elements per float16 scale of a k-quant
KQUANTS = ("q4_k", "q6_k", "q5_0")
SUPER_SCALED = ("q4_k", "q6_k")  # the k-quants proper: a float16 scale per 256 over integer scale codes
HIGH_BITS = {"q6_k": 2, "q5_0": 1}  # code bits above the low nibble, held in qhigh


@dataclass
class QuantizedWeight:
    bits: int  # 4 or 8; 6 for q6_k, 5 for q5_0
    qweight: torch.Tensor  # int4, k-quants: uint8 [out, in // 2] (q6_k: the codes' low nibbles); int8: int8 [out, in]
    scales: torch.Tensor  # float16 or float32 [out, in // group_size]; k-quants: their scale codes (q4_k: with mins)
    mins: torch.Tensor | None  # plain int4 only: same shape and dtype as scales
    group_size: int
    tiled: bool = False  # the native kernels' layout (see tile()); shapes are the same in both layouts
    kquant: str | None = None  # one of KQUANTS: GGUF's block format at its own size
    qhigh: torch.Tensor | None = None  # q6_k, q5_0: the codes' high bits, uint8 [out, in * HIGH_BITS // 8]
    super_scales: torch.Tensor | None = None  # k-quants: float16 [out, in // 256] (q4_k: d and dmin, [out, in // 128])

    def __post_init__(self) -> None:
        if self.bits != {"q6_k": 6, "q5_0": 5}.get(self.kquant, self.bits) or self.bits not in (4, 8, 6, 5):
            raise ValueError(f"bits must be 4 or 8 (6 for q6_k, 5 for q5_0), got {self.bits}")
        if self.kquant is not None:
            super_scaled = self.kquant in SUPER_SCALED
            if self.kquant not in KQUANTS or not self.tiled or (self.super_scales is not None) != super_scaled \
                    or self.mins is not None or (self.qhigh is not None) != (self.kquant in HIGH_BITS) \
                    or (super_scaled and self.in_features % SUPER_BLOCK):
                raise ValueError(f"a {self.kquant} weight is tiled, has no mins, and has super_scales (with a multiple "
                                 f"of {SUPER_BLOCK} inputs) for {SUPER_SCALED}, qhigh for {tuple(HIGH_BITS)}")
        elif (self.mins is None) != (self.bits == 8):
            raise ValueError("int4 weights need mins; int8 weights have none")
        if (self.group_size % BLOCK and (self.bits, self.group_size) not in ((8, 16), (6, 16))) \
                or self.in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} must be a multiple of {BLOCK} (or 16 for int8) dividing "
                             f"{self.in_features}")
        if self.tiled and (self.group_size != (16 if self.bits == 6 else BLOCK) or self.out_features % TILE_ROWS):
            raise ValueError(f"a tiled weight has group_size {BLOCK} and a multiple of {TILE_ROWS} rows")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (1 if self.bits == 8 else 2)

    @property
    def format_name(self) -> str:
        """e.g. int4_g32, or Q4_K for a k-quant."""
        return self.kquant.upper() if self.kquant else f"int{self.bits}_g{self.group_size}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the weight, by field name."""
        fields = ("qweight", "scales", "mins", "qhigh", "super_scales")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

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
        n, tiles, blocks, _ = self._tile_shape()

        def per_block(t: torch.Tensor) -> torch.Tensor:
            t = t.repeat_interleave(self.group_size // BLOCK, dim=1)
            return t.view(tiles, TILE_ROWS, blocks).transpose(1, 2).reshape(n, blocks)

        return QuantizedWeight(self.bits, interleave_rows(self.qweight, blocks), per_block(self.scales),
                               None if self.mins is None else per_block(self.mins), BLOCK, tiled=True)

    def untile(self) -> QuantizedWeight:
        """The row layout (group size 32 when it was tiled); a k-quant expands to the plain format."""
        if not self.tiled:
            return self
        if self.kquant is not None:
            return self._expand()
        n, tiles, blocks, _ = self._tile_shape()

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.view(tiles, blocks, TILE_ROWS).transpose(1, 2).reshape(n, blocks)

        return QuantizedWeight(self.bits, self.row_qweight(), per_row(self.scales),
                               None if self.mins is None else per_row(self.mins), BLOCK)

    def row_qweight(self) -> torch.Tensor:
        """qweight in the row layout."""
        _, tiles, blocks, chunks = self._tile_shape()
        q = self.qweight.view(tiles, blocks, chunks, TILE_ROWS, CHUNK_BYTES).permute(0, 3, 1, 2, 4)
        return q.reshape(self.qweight.shape)

    def _tile_shape(self) -> tuple[int, int, int, int]:
        """Rows, tiles of 8 rows, 32-blocks per row, and 4-byte chunks of qweight per row's 32-block."""
        n, k = self.shape
        return n, n // TILE_ROWS, k // BLOCK, self.qweight.shape[1] // (k // BLOCK) // CHUNK_BYTES

    def kquant_scales(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """A q4_k or q6_k weight's scale codes in the row layout: q4_k's 6-bit scales and mins per 32 (uint8 [out,
        in // 32] each) and float16 d, dmin per 256 ([out, in // 256, 2]); q6_k's int8 scales per 16 ([out,
        in // 16]), no mins, and float16 d per 256 ([out, in // 256, 1])."""
        n, tiles, blocks, _ = self._tile_shape()
        supers = self.in_features // SUPER_BLOCK
        if self.kquant == "q4_k":
            codes = self.scales.view(tiles, blocks, 12)
            low = codes[..., :TILE_ROWS]
            words = codes[..., TILE_ROWS:]
            high = torch.stack([words & 0x0F, words >> 4], -1).view(tiles, blocks, TILE_ROWS)
            sc, m = (low & 15) | (high & 3) << 4, (low >> 4) | (high >> 2) << 4
            dm = self.super_scales.view(tiles, supers, 2, TILE_ROWS).permute(0, 3, 1, 2).reshape(n, supers, 2)
            return tuple(t.transpose(1, 2).reshape(n, blocks) for t in (sc, m)) + (dm,)
        if self.kquant != "q6_k":
            raise ValueError(f"{self.format_name} has no super scales")
        sc = self.scales.view(tiles, blocks, 2, TILE_ROWS).permute(0, 3, 1, 2).reshape(n, -1)
        d = self.super_scales.view(tiles, supers, TILE_ROWS).transpose(1, 2).reshape(n, supers, 1)
        return sc, None, d

    def _expand(self) -> QuantizedWeight:
        """A k-quant as the plain row-layout format with float32 scales (and mins), the same values."""
        n, tiles, blocks, _ = self._tile_shape()
        nibbles = self.row_qweight()
        if self.kquant == "q4_k":
            sc, m, dm = self.kquant_scales()
            dm = dm.float().repeat_interleave(SUPER_BLOCK // BLOCK, dim=1)
            return QuantizedWeight(4, nibbles, dm[..., 0] * sc.float(), -(dm[..., 1] * m.float()), BLOCK)
        low = torch.cat([(b := nibbles.view(n, blocks, BLOCK // 2)) & 0x0F, b >> 4], -1).view(tiles, TILE_ROWS, -1)
        if self.kquant == "q5_0":  # bit 2c + half of byte (row, j): element 16 * half + 4c + j
            shifts = torch.arange(8, dtype=torch.uint8).view(4, 2)  # [chunk, half]
            high = (self.qhigh.view(tiles, blocks, TILE_ROWS, CHUNK_BYTES, 1, 1) >> shifts) & 1
            high = high.permute(0, 2, 1, 5, 4, 3).reshape(tiles, TILE_ROWS, -1)  # -> [tile, row, block, half, c, j]
            codes = ((low | high << 4).to(torch.int8) - 16).reshape(n, -1)
            scales = self.scales.view(tiles, blocks, TILE_ROWS).transpose(1, 2).reshape(n, blocks)
            return QuantizedWeight(8, codes, scales, None, BLOCK)
        shifts = torch.tensor([[0, 2], [4, 6]], dtype=torch.uint8)  # [chunk parity, half of the block]
        high = (self.qhigh.view(tiles, blocks, 2, TILE_ROWS, CHUNK_BYTES, 1, 1) >> shifts) & 3
        high = high.permute(0, 3, 1, 6, 2, 5, 4).reshape(tiles, TILE_ROWS, -1)  # -> [tile, row, block, half, chunk, j]
        codes = ((low | high << 4).to(torch.int8) - 32).reshape(n, -1)
        sc, _, d = self.kquant_scales()
        return QuantizedWeight(8, codes, d[..., 0].float().repeat_interleave(SUPER_BLOCK // 16, dim=1) * sc.float(),
                               None, 16)

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
        if any((p.bits, p.group_size, p.scales.dtype, p.in_features, p.tiled, p.kquant) != (first.bits,
               first.group_size, first.scales.dtype, first.in_features, first.tiled, first.kquant) for p in parts):
            raise ValueError("cannot fuse quantized weights of different formats")
        joined = {f: torch.cat([p.tensors()[f] for p in parts]) for f in first.tensors()}
        return QuantizedWeight(first.bits, group_size=first.group_size, tiled=first.tiled, kquant=first.kquant,
                               **{"mins": None, **joined})


def interleave_rows(q: torch.Tensor, blocks: int) -> torch.Tensor:
    """Row-layout code bytes [out, blocks * chunks * 4] in the tiled order: per 8 rows and 32-block, chunk by
    chunk, each chunk's 4 bytes of every row side by side (QuantizedWeight.tile)."""
    n = q.shape[0]
    return q.view(n // TILE_ROWS, TILE_ROWS, blocks, -1, CHUNK_BYTES).permute(0, 2, 3, 1, 4).reshape(q.shape)


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
