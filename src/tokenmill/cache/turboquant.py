"""TurboQuant codes for KV cache rows (Zandieh et al., 2025): after the random rotation (kv_cache.rotate), the
coordinates of a head row are close to independent, each distributed as a coordinate of a uniform point on the
sphere; an optimal scalar quantizer for that distribution (a Lloyd-Max codebook, fitted once per head_dim) then
serves every row, and one float16 scale per row restores its length.

Keys get half a bit more than the average and values half a bit less (at 4 bits: both 4): an attention's weights
depend on the keys' codes alone, and on real models perplexity follows their error; values at 2.5 bits cost more
than a further half bit on keys gains (benchmarks/kv_codes_error.py and the measurements in BENCHMARKS.md). Keys
do not spend a bit on QJL's sketch of the residual (Zandieh et al., 2024) either: it makes scores unbiased but
noisier, and measured 5.5-6x the attention KL of the same bits spent on codes.

A row of D codes: the first `split` coordinates at `hi` bits, the rest at `lo` bits (fractional budgets: 3.5
bits = half at 4, half at 3; the rotation makes every coordinate alike, so which ones get the extra bit does not
matter). Each part is stored as bit fields (5: a 4-bit and a 1-bit field; 4; 3: a 2-bit and a 1-bit field; 2;
1), a field of n
coordinates holding coordinate i at bits [i * w, (i + 1) * w) of its n * w / 8 bytes, little-endian: 8
coordinates are one w-byte word, which a vector shift spreads over 8 lanes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from tokenmill.config import KV_CACHE_BITS as BITS

DEFAULT_BITS = 3.5
_FIELDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1)}  # widths of the fields of a part's codes, low bits first


@cache
def codebook(bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max centroids (float32 [2^bits], ascending) and decision boundaries ([2^bits - 1]) for u =
    sqrt(dim) * x_i, x uniform on the unit sphere in R^dim: density ~ (1 - u^2 / dim)^((dim - 3) / 2)."""
    u = torch.linspace(-math.sqrt(dim), math.sqrt(dim), 400_001, dtype=torch.float64)[1:-1]
    density = (1 - u * u / dim).clamp_min(0) ** ((dim - 3) / 2)
    levels, zero = 2**bits, torch.zeros(1, dtype=torch.float64)
    mass, moment = torch.cat((zero, density.cumsum(0))), torch.cat((zero, (density * u).cumsum(0)))  # prefix sums
    centroids = u[torch.searchsorted(mass / mass[-1], (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)]
    for _ in range(300):  # Lloyd's iterations: boundaries at midpoints, centroids at their cell's mean
        edges = torch.searchsorted(u, (centroids[1:] + centroids[:-1]) / 2)
        edges = torch.cat((edges.new_zeros(1), edges, edges.new_full((1,), len(u))))
        centroids = (moment[edges[1:]] - moment[edges[:-1]]) / (mass[edges[1:]] - mass[edges[:-1]])
        centroids = (centroids - centroids.flip(0)) / 2  # the density is even: so is the optimum
    return centroids.float(), ((centroids[1:] + centroids[:-1]) / 2).float()


@dataclass(frozen=True)
class RowCode:
    """How one head row of `dim` coordinates is coded at `bits` per coordinate (1-5, in halves)."""

    dim: int
    bits: float

    @property
    def hi(self) -> int:
        return math.ceil(self.bits)

    @property
    def lo(self) -> int:
        return math.floor(self.bits)

    @property
    def split(self) -> int:
        """Coordinates [0, split) take hi bits, [split, dim) lo bits."""
        return round((self.bits - self.lo) * self.dim) if self.hi != self.lo else self.dim

    def parts(self) -> list[tuple[int, int, int]]:
        """(first coordinate, count, bits) of each part, in storage order."""
        return [(s, n, b) for s, n, b in ((0, self.split, self.hi), (self.split, self.dim - self.split, self.lo)) if n]

    @property
    def nbytes(self) -> int:
        return sum(n * b for _, n, b in self.parts()) // 8


@dataclass(frozen=True)
class TurboQuant:
    """A turboquant cache's row codes at `bits` per element on average over keys and values."""

    dim: int
    bits: float = DEFAULT_BITS

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"kv_cache_bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")

    @property
    def key(self) -> RowCode:
        return RowCode(self.dim, min(4.0, self.bits + 0.5))

    @property
    def value(self) -> RowCode:
        return RowCode(self.dim, 2 * self.bits - self.key.bits)

    def row_bytes(self, key: bool) -> int:
        """Code bytes of one key (or value) row; its float16 scale is stored apart."""
        return (self.key if key else self.value).nbytes

    def table(self) -> torch.Tensor:
        """The keys' and values' codes as the native kernels' RowCodes array (csrc/paged_attention.h), int32
        [2, 136]: eight ints (D, log2 D, split, hi, lo, row bytes, 0, 0), then the hi and lo parts'
        centroids and boundaries as float32 bits, 32 each (padded with +inf)."""
        rows = []
        for code in (self.key, self.value):
            header = torch.tensor([code.dim, code.dim.bit_length() - 1, code.split, code.hi, code.lo, code.nbytes,
                                   0, 0], dtype=torch.int32)
            tables = torch.full((4, 32), math.inf)
            for part, bits in enumerate((code.hi, code.lo)):
                centroids, bounds = codebook(bits, code.dim)
                tables[part, :len(centroids)] = centroids
                tables[2 + part, :len(bounds)] = bounds
            rows.append(torch.cat((header, tables.flatten().view(torch.int32))))
        return torch.stack(rows)


def _pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes [..., n] (< 2^width) -> bytes [..., n * width / 8]: coordinate i at bits [i * width, (i + 1) * width)."""
    per_byte = 8 // width
    groups = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (groups << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    shifts = torch.arange(8 // width, dtype=torch.int32) * width
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)
    return codes.flatten(-2)


def _encode_codes(codes: torch.Tensor, code: RowCode) -> torch.Tensor:
    fields = []
    for start, n, bits in code.parts():
        part, shift = codes[..., start:start + n], 0
        for width in _FIELDS[bits]:
            fields.append(_pack((part >> shift) & ((1 << width) - 1), width))
            shift += width
    return torch.cat(fields, -1)


def _decode_codes(packed: torch.Tensor, code: RowCode) -> torch.Tensor:
    parts, at = [], 0
    for _, n, bits in code.parts():
        part, shift = 0, 0
        for width in _FIELDS[bits]:
            nbytes = n * width // 8
            part = part + (_unpack(packed[..., at:at + nbytes], width) << shift)
            at, shift = at + nbytes, shift + width
        parts.append(part)
    return torch.cat(parts, -1)


def _levels(code: RowCode) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(coordinates, centroids, boundaries) of each part, centroids in units of |x| / sqrt(dim)."""
    return [(slice(s, s + n), *codebook(b, code.dim)) for s, n, b in code.parts()]


def quantize(x: torch.Tensor, code: RowCode) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated rows [..., D] float32 -> (packed codes uint8 [..., code.nbytes], float16 scales [...]). Each
    coordinate takes the centroid nearest to x_i * sqrt(D) / |x|; the scale is the least-squares one for the
    chosen centroids (<x, c> / <c, c>: smaller error than |x| / sqrt(D))."""
    norm = x.norm(dim=-1, keepdim=True)
    unit = x * (math.sqrt(code.dim) / torch.where(norm > 0, norm, torch.ones_like(norm)))
    codes = torch.empty(x.shape, dtype=torch.int32)
    centred = torch.empty_like(x)
    for where, centroids, bounds in _levels(code):
        codes[..., where] = torch.bucketize(unit[..., where].contiguous(), bounds, out_int32=True)
        centred[..., where] = centroids[codes[..., where]]
    energy = (centred * centred).sum(-1)
    scales = ((x * centred).sum(-1) / torch.where(energy > 0, energy, torch.ones_like(energy))).half()
    return _encode_codes(codes, code), scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor, code: RowCode) -> torch.Tensor:
    """quantize's inverse (still rotated), float32 [..., D]."""
    codes = _decode_codes(packed, code)
    out = torch.empty(*codes.shape, dtype=torch.float32)
    for where, centroids, _ in _levels(code):
        out[..., where] = centroids[codes[..., where]]
    return out * scales.float()[..., None]
