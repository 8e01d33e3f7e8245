"""The KV tensors: per slot (see kv_layout), K and V as [num_blocks, block_size, kv_heads, head_dim], sized from a
byte budget. Compressed caches (CacheConfig.kv_cache_dtype):
- int8: codes with one float32 scale per (slot, token, KV head) for K and for V: x = scale * code, scale =
  max|x| / 127 over the head's row (symmetric, per token and head).
- int4: each head row turned by R = H diag(signs) / sqrt(head_dim) (a Walsh-Hadamard transform with a fixed
  random sign vector per layer: orthogonal, so q.k = Rq.Rk, and it spreads outlier channels over the row), then
  4-bit codes per group of 32 with a float16 scale (Q4_0's rule: d = the group's largest-magnitude value / -8,
  x = d * (code - 8)): 4.5 bits per element. Stored as uint8 [..., head_dim / 2] (byte j of a group = element j
  | element 16 + j << 4) and float16 scales [..., head_dim / 32]. Readers attend in the rotated space (queries
  turned by R, outputs back by R^T) or un-rotate what they read.
- turboquant: rotated as int4, then each coordinate coded by a Lloyd-Max codebook for the rotated coordinates'
  distribution at `kv_cache_bits` per element on average (2.5-4; keys half a bit more than values;
  cache/turboquant.py) with one float16 scale per row; stored as torch.bits8 (opaque bytes) [..., code bytes]
  and float16 scales [..., 1].
Rotated caches may also smooth keys (SmoothAttention, QServe): per layer, KV head and channel a factor s
(model/kv_smoothing.py) that keys are divided by and queries multiplied by before the rotation, so q.k is unchanged
while channels where keys are large and queries small stop setting the codes' range; it is folded into the rotation
(`rotation`: queries turned by H diag(signs * s), keys by H diag(signs / s), values by H diag(signs)).
Compressed caches may also keep recent rows (CacheConfig.kv_cache_recent_blocks, as KIVI keeps its newest tokens
in full precision): the blocks near each sequence's end have a float16 twin holding their rows as the codes
approximate them (rotated, keys minus the offset), and a query reads the blocks of its aligned group of
recent_blocks blocks, up to its own, from there (cache/recent_rows.py assigns the twins; csrc/paged_attention.h
KVCacheRef).
All three store keys minus the layer's key offset (LlamaModel.key_offsets: the constant part of its keys, e.g. Qwen2's
k bias, hundreds in its first layers): every key loses the same vector, so each query's scores move by one
constant and the softmax is unchanged, while the codes no longer spend their range on it."""
from __future__ import annotations

import math
import mmap
from typing import NamedTuple

import torch

from tokenmill.cache import turboquant as tq
from tokenmill.cache.kv_layout import KVLayout
from tokenmill.config import CacheInfo, ModelConfig
from tokenmill.kernels.native import available as kernels_available

INT4 = torch.uint8  # the element type of an int4 cache: two 4-bit codes per byte
INT4_GROUP = 32  # elements per int4 scale
TURBOQUANT = torch.bits8  # the element type of a turboquant cache: packed codes (cache/turboquant.py)
ROTATED = (INT4, TURBOQUANT)  # the element types stored in the rotated space
COMPRESSED = (torch.int8, *ROTATED)  # the element types stored as codes with scales (and keys minus an offset)
_SIGN_SEED = 0x5EED  # the rotation signs of layer l come from seed _SIGN_SEED + l: fixed, so saved caches agree


def resolve_kv_dtype(name: str, compute_dtype: torch.dtype, packed_weights: bool) -> torch.dtype:
    """The cache's element type for CacheConfig.kv_cache_dtype `name`. "auto": float16 when packed weights run
    on the native CPU kernels in float32 (the native-quantized default), else the compute dtype. Why: at high
    concurrency a float32 cache streams several times more bytes per step than the weights; float16 halves
    that (F16C converts on load), as llama.cpp's f16 and vLLM's bf16 caches do. The exact float paths (an
    explicit float dtype, unquantized weights) keep the compute dtype, so reference tests see no rounding."""
    if name == "auto":
        native = packed_weights and compute_dtype == torch.float32 and kernels_available()
        return torch.float16 if native else compute_dtype
    return _NAMED.get(name) or getattr(torch, name)


_NAMED = {"int4": INT4, "turboquant": TURBOQUANT}


def dtype_name(dtype: torch.dtype) -> str:
    """The kv_cache_dtype name of a cache element type."""
    return next((name for name, named in _NAMED.items() if named == dtype), str(dtype).removeprefix("torch."))


def bytes_per_head_row(head_dim: int, dtype: torch.dtype, turbo: tq.TurboQuant | None = None, key: bool = True) -> int:
    """One token's K (or V, key=False) of one KV head, with its scales; `turbo`: a turboquant cache's codes."""
    if dtype == INT4:
        return head_dim // 2 + 2 * (head_dim // INT4_GROUP)
    if dtype == TURBOQUANT:
        return turbo.row_bytes(key) + 2
    return head_dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)


def recent_twin_bytes(model: ModelConfig, block_size: int) -> int:
    """K and V of one float16 twin block of recent rows, over all its layers."""
    return KVLayout.from_config(model).slots * block_size * model.num_kv_heads * model.head_dim * 2 * 2


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, turbo: tq.TurboQuant | None = None) -> int:
    """K and V of one block: `slots` layers (all layers for a model without sliding windows), with the scales
    of compressed types."""
    per_head = sum(bytes_per_head_row(model.head_dim, dtype, turbo, key) for key in (True, False))
    return KVLayout.from_config(model).slots * block_size * model.num_kv_heads * per_head


def check_head_dim(dtype: torch.dtype, head_dim: int) -> None:
    """Rotated caches turn head rows by a Walsh-Hadamard transform: head_dim a power of two, >= one int4 group."""
    if dtype in ROTATED and (head_dim < INT4_GROUP or head_dim & (head_dim - 1)):
        raise ValueError(f"kv_cache_dtype {dtype_name(dtype)} needs a power-of-two head_dim of at least "
                         f"{INT4_GROUP}; this model's is {head_dim}")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] float32 -> int8 codes and float32 scales [...], as the native write computes them (the
    same float32 operations, rounded to nearest even), so both paths store the same bytes."""
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[..., None]).to(torch.int8), amax / 127.0


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_int8's inverse, float32 [..., head_dim]."""
    return codes.float() * scales[..., None]


def rotation_signs(layer: int, head_dim: int) -> torch.Tensor:
    """Layer `layer`'s fixed random signs (+-1.0, float32 [head_dim]) for the int4 cache's rotation."""
    generator = torch.Generator().manual_seed(_SIGN_SEED + layer)
    return torch.randint(0, 2, (head_dim,), generator=generator).float() * 2 - 1


def fwht(x: torch.Tensor) -> torch.Tensor:
    """H x over the last dimension (a power of two): the unnormalized Walsh-Hadamard transform, its sums and
    differences in the native kernel's order (csrc/paged_attention.cpp fwht), so both give the same floats."""
    d, h = x.shape[-1], 1
    while h < d:
        pairs = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*x.shape[:-1], d)
        h *= 2
    return x


def _norm(d: int) -> torch.Tensor:
    return torch.tensor(float(d)).sqrt().reciprocal()  # 1 / sqrt(d) in float32 ops, as the kernel computes it


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R x = H (signs * x) / sqrt(D) over the last dimension (float32)."""
    return fwht(x * signs) * _norm(x.shape[-1])


def unrotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """rotate's inverse: (H x) / sqrt(D) / signs (R^T x where signs are +-1)."""
    return fwht(x) * _norm(x.shape[-1]) / signs


def rotation(layer: int, kv_heads: int, head_dim: int, smoothing: torch.Tensor | None = None) -> torch.Tensor:
    """Layer `layer`'s rotation vectors [3, kv_heads, head_dim] float32: the queries' (signs * s), the keys'
    (signs / s) and the values' (signs), s the keys' smoothing factors [kv_heads, head_dim] (None: 1, the plain
    rotation, whose three vectors are the signs; csrc/paged_attention.h RotationPart)."""
    signs = rotation_signs(layer, head_dim).expand(kv_heads, head_dim)
    if smoothing is None:
        return signs.expand(3, kv_heads, head_dim).contiguous()
    s = smoothing.float()
    return torch.stack((signs * s, signs / s, signs)).contiguous()


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated rows [..., D] float32 -> codes uint8 [..., D / 2] and float16 scales [..., D / 32], as the native
    write computes them (module docstring)."""
    groups = x.reshape(*x.shape[:-1], -1, INT4_GROUP)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)  # the first largest |x|
    scales = (extreme / -8.0).half()
    d = scales.float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = (torch.round(groups * inv[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return packed.reshape(*x.shape[:-1], -1), scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_int4's inverse (still rotated), float32 [..., D]."""
    groups = codes.reshape(*codes.shape[:-1], -1, 16)
    values = torch.cat((groups & 15, groups >> 4), dim=-1).float() - 8
    return (values * scales.float()[..., None]).reshape(*codes.shape[:-1], -1)


def encode(x: torch.Tensor, dtype: torch.dtype, signs: torch.Tensor | None, offset: torch.Tensor | None = None,
           code: tq.RowCode | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [..., D] as a cache of element type `dtype` stores them: (elements, scales or None); compressed
    types take `offset` (keys: [KV, D]) off first; turboquant codes rows by `code`."""
    if offset is not None and dtype in COMPRESSED:
        x = x.float() - offset
    if dtype == torch.int8:
        return quantize_int8(x.float())
    if dtype == INT4:
        return quantize_int4(rotate(x.float(), signs))
    if dtype == TURBOQUANT:
        codes, scales = tq.quantize(rotate(x.float(), signs), code)
        return codes.view(TURBOQUANT), scales[..., None]
    return x.to(dtype), None


def decode(elements: torch.Tensor, scales: torch.Tensor | None, signs: torch.Tensor | None, dtype: torch.dtype,
           code: tq.RowCode | None = None) -> torch.Tensor:
    """encode's inverse, in `dtype` (rotated rows turned back by R^T)."""
    if elements.dtype == torch.int8:
        return dequantize_int8(elements, scales).to(dtype)
    if elements.dtype == INT4:
        return unrotate(dequantize_int4(elements, scales), signs).to(dtype)
    if elements.dtype == TURBOQUANT:
        return unrotate(tq.dequantize(elements.view(torch.uint8), scales[..., 0], code), signs).to(dtype)
    return elements.to(dtype)


class CacheSide(NamedTuple):
    """What encode and decode need for one of a layer's two caches (K or V)."""

    elements: torch.Tensor  # [num_blocks, block_size, kv_heads, width]
    scales: torch.Tensor | None
    signs: torch.Tensor | None
    offset: torch.Tensor | None = None
    code: tq.RowCode | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode(x, self.elements.dtype, self.signs, self.offset, self.code)

    def decode(self, elements: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return decode(elements, scales, self.signs, dtype, self.code)


class LayerKV(NamedTuple):
    """One model layer's view of the cache: K and V [num_blocks, block_size, kv_heads, width] (head_dim; int4:
    head_dim / 2; turboquant: code bytes), the scales of int8 ([..., kv_heads]), int4 ([..., kv_heads,
    head_dim / 32]) and turboquant ([..., kv_heads, 1]) caches, the rotation's vectors [3, kv_heads, head_dim]
    (`rotation`) and the
    compressed caches' key offset [kv_heads, head_dim] (None otherwise), turboquant's codes (as the native
    kernels read them, TurboQuant.table, and as the PyTorch path does)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    signs: torch.Tensor | None = None
    k_offset: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    turbo: tq.TurboQuant | None = None
    recent_k: torch.Tensor | None = None  # recent rows: float16 twins [twins, block_size, kv_heads, head_dim]
    recent_v: torch.Tensor | None = None
    recent_of: torch.Tensor | None = None  # int32 [blocks]: each block's twin, -1 none
    recent_blocks: int = 0

    def side(self, key: bool) -> CacheSide:
        if key:
            return CacheSide(self.k, self.k_scale, self.rotation(1), self.k_offset, self.turbo and self.turbo.key)
        return CacheSide(self.v, self.v_scale, self.rotation(2), None, self.turbo and self.turbo.value)

    def rotation(self, part: int) -> torch.Tensor | None:
        """Rotated caches: the vectors [kv_heads, head_dim] that turn queries (0), keys (1) or values (2)."""
        return None if self.signs is None else self.signs[part]


def _lazily_zeroed(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed memory that the OS only backs with pages once written.

    An anonymous mmap is guaranteed to read as zeros (so unwritten slots are finite, which matters
    when masked attention multiplies them by 0) and costs resident memory only for blocks in use. 64 bytes of
    slack at the end: the turboquant reader loads whole 4-byte words past a row's last code bytes.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, numel * itemsize + 64)
    return torch.frombuffer(buffer, dtype=dtype, count=numel)


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 key_offsets: torch.Tensor | None = None, turbo: tq.TurboQuant | None = None,
                 device: torch.device | None = None, padding_block: bool = False,
                 smoothing: torch.Tensor | None = None, recent_blocks: int = 0, recent_twins: int = 0) -> None:
        """key_offsets: [layers, kv_heads, head_dim], taken off the keys by compressed types (module docstring);
        smoothing: [layers, kv_heads, head_dim], the keys' smoothing factors of a rotated cache (None: none);
        turbo: a turboquant cache's codes (default: DEFAULT_BITS); device: where the blocks live (None: CPU
        memory mapped lazily; the GPU path's caches hold float or int8 elements); padding_block: one block more,
        id num_blocks, that no request gets: padding rows of fixed-size steps write and read it
        (model/decode_graphs.py); recent_blocks, recent_twins: a compressed cache's recent rows (module docstring),
        each query reading its aligned group of `recent_blocks` blocks from `recent_twins` float16 twin blocks."""
        check_head_dim(dtype, model.head_dim)
        on_cpu = device is None or device.type == "cpu"
        if not on_cpu and dtype == TURBOQUANT:
            raise ValueError(f"kv_cache_dtype turboquant is not supported on {device.type}: use auto, float16, "
                             "bfloat16, float32, int8 or int4")
        zeroed = _lazily_zeroed if on_cpu else lambda numel, t: torch.zeros(numel, dtype=t, device=device)
        if dtype == TURBOQUANT:
            turbo = turbo or tq.TurboQuant(model.head_dim)
        elif turbo is not None:
            raise ValueError(f"turboquant codes given for a {dtype_name(dtype)} cache")
        if recent_blocks and (dtype not in COMPRESSED or not on_cpu):
            raise ValueError(f"recent rows are kept only by compressed caches on the CPU path, not {dtype_name(dtype)} "
                             f"on {device}")
        if smoothing is not None and dtype not in ROTATED:
            raise ValueError(f"key smoothing given for a {dtype_name(dtype)} cache (only int4 and turboquant rotate)")
        self.num_blocks, self.block_size, self.dtype, self.turbo = num_blocks, block_size, dtype, turbo
        self.smoothed = smoothing is not None  # keys smoothed (model/kv_smoothing.py)
        self.recent_blocks = recent_blocks if recent_twins else 0
        self.info = CacheInfo(num_blocks, block_size, dtype_name(dtype),
                              bytes_per_block(model, block_size, dtype, turbo), turbo and turbo.bits,
                              self.recent_blocks)
        self.layout = KVLayout.from_config(model)
        self.padding_block = num_blocks if padding_block else None
        rows = (self.layout.slots, num_blocks + padding_block, block_size, model.num_kv_heads)
        widths = {INT4: (model.head_dim // 2,) * 2}.get(dtype, (model.head_dim,) * 2)
        if turbo is not None:
            widths = (turbo.row_bytes(True), turbo.row_bytes(False))
        self.k, self.v = (zeroed(math.prod(rows) * w, dtype).view(*rows, w) for w in widths)
        self.k_scale = self.v_scale = self.signs = self.k_offsets = self.codes = None
        if dtype == torch.int8:
            self.k_scale = zeroed(math.prod(rows), torch.float32).view(rows)
            self.v_scale = zeroed(math.prod(rows), torch.float32).view(rows)
        elif dtype in ROTATED:
            groups = model.head_dim // INT4_GROUP if turbo is None else 1
            self.k_scale = _lazily_zeroed(math.prod(rows) * groups, torch.float16).view(*rows, groups)
            self.v_scale = _lazily_zeroed(math.prod(rows) * groups, torch.float16).view(*rows, groups)
            self.signs = torch.stack([rotation(layer, model.num_kv_heads, model.head_dim,
                                               None if smoothing is None else smoothing[layer])
                                      for layer in range(model.num_layers)]).to(device)
        if turbo is not None:
            self.codes = turbo.table()
        if dtype in COMPRESSED and key_offsets is not None:
            self.k_offsets = key_offsets.float().contiguous().to(device)
        self.recent_k = self.recent_v = self.recent_of = None
        if self.recent_blocks:
            twin_rows = (self.layout.slots, recent_twins, block_size, model.num_kv_heads, model.head_dim)
            self.recent_k, self.recent_v = (_lazily_zeroed(math.prod(twin_rows), torch.float16).view(twin_rows)
                                            for _ in range(2))
            self.recent_of = torch.full((num_blocks + padding_block,), -1, dtype=torch.int32)

    def layer(self, layer: int) -> LayerKV:
        """The blocks that model layer `layer` reads and writes."""
        slot = self.layout.slot_of[layer]
        if self.k_scale is None:
            return LayerKV(self.k[slot], self.v[slot])
        signs = None if self.signs is None else self.signs[layer]
        offset = None if self.k_offsets is None else self.k_offsets[layer]
        recent = ((self.recent_k[slot], self.recent_v[slot], self.recent_of, self.recent_blocks) if self.recent_blocks
                  else ())
        return LayerKV(self.k[slot], self.v[slot], self.k_scale[slot], self.v_scale[slot], signs, offset, self.codes,
                       self.turbo, *recent)
