"""GpuWeight: a QuantizedWeight in the layout the GPU kernels read (kernels/gpu/qlinear.py), at the same bits per
weight as the CPU's: a Q4_K_M file's blocks stay 4.6-6.6 bits on the GPU, never a float copy.

Rows are plain (no tiling: a GPU tile loads whole rows of 32-blocks), and every format decodes the same way, so
one kernel serves them all:
  code = low | high << 4            low: the 4 low bits (int8 formats: the whole code); high: q6_k's 2 and q5_0's 1
  w    = scale * (code - zero) + min
with scale and min per group of 32 (q6_k: 16) elements:
- int8 (GGUF Q8_0, tokenmill int8, expanded k-quants): scale = float scales, zero = 0, min = 0.
- int4 (GGUF Q4_0/Q4_1, tokenmill int4): scale, min = float scales and mins, zero = 0.
- q4_k: scale = d * sc, min = -(dmin * m): 6-bit codes sc and m per 32, float16 d and dmin per 256.
- q6_k: scale = d * sc (int8 sc per 16, float16 d per 256), zero = 32.
- q5_0: scale = float16 scale, zero = 16.
Every product is formed in float32 in QuantizedWeight.dequantize's order, so the kernels' values are its values.

Byte order: `low` keeps GGUF's per-32 nibble order (byte j of a block holds element j low, element j + 16 high);
`high` packs each row's elements in order, `bits` per element from the byte's low bits up.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tokenmill.quant.weights import HIGH_BITS, QuantizedWeight

FORMATS = ("int8", "int4", "q4_k", "q6_k", "q5_0")  # the kernels' FMT argument is the index
ZERO = {"q6_k": 32, "q5_0": 16}


@dataclass
class GpuWeight:
    fmt: str  # one of FORMATS
    low: torch.Tensor  # uint8 [out, in // 2] nibbles; int8 formats: int8 [out, in]
    scales: torch.Tensor  # [out, in // group]: float16/float32; q4_k: uint8 codes; q6_k: int8 codes
    group: int  # elements per scale: 32, or 16 (q6_k and int8 with 16-groups)
    high: torch.Tensor | None = None  # uint8 [out, in * HIGH_BITS // 8]: q6_k, q5_0
    mins: torch.Tensor | None = None  # [out, in // group]: int4 float mins; q4_k uint8 codes
    supers: torch.Tensor | None = None  # float16 [out, in // 256, 2]: q4_k d, dmin; [..., 1]: q6_k d

    @property
    def out_features(self) -> int:
        return self.low.shape[0]

    @property
    def in_features(self) -> int:
        return self.low.shape[1] * (1 if self.low.dtype == torch.int8 else 2)

    @property
    def format_name(self) -> str:
        return self.fmt.upper() if self.fmt in ZERO or self.fmt == "q4_k" else f"{self.fmt}_g{self.group}"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> GpuWeight:
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})


def gpu_layout(w: QuantizedWeight) -> GpuWeight:
    """The same values in the GPU kernels' layout (module docstring)."""
    if w.kquant is None:
        plain = w.untile()
        fmt = "int8" if plain.bits == 8 else "int4"
        return GpuWeight(fmt, plain.qweight.contiguous(), plain.scales.contiguous(), plain.group_size,
                         mins=None if plain.mins is None else plain.mins.contiguous())
    nibbles = w.row_qweight().contiguous()
    if w.kquant == "q4_k":
        sc, m, dm = w.kquant_scales()
        return GpuWeight("q4_k", nibbles, sc.contiguous(), 32, mins=m.contiguous(), supers=dm.contiguous())
    expanded = w.untile()  # int8 codes (code - zero), the exact high bits' source
    high = _pack_bits(((expanded.qweight.to(torch.int16) + ZERO[w.kquant]) >> 4).to(torch.uint8), HIGH_BITS[w.kquant])
    if w.kquant == "q5_0":
        return GpuWeight("q5_0", nibbles, expanded.scales.contiguous(), 32, high=high)
    sc, _, d = w.kquant_scales()
    return GpuWeight("q6_k", nibbles, sc.contiguous(), 16, high=high, supers=d.contiguous())


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] integers below 2**bits -> uint8 [out, in * bits // 8], element e at bit (e * bits) % 8 of byte
    e * bits // 8."""
    per_byte = 8 // bits
    parts = values.view(values.shape[0], -1, per_byte).to(torch.uint8)
    packed = torch.zeros(parts.shape[:2], dtype=torch.uint8)
    for i in range(per_byte):
        packed |= parts[..., i] << (bits * i)
    return packed
