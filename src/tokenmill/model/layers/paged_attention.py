"""Attention over the paged KV cache, in plain PyTorch ops (a swappable backend: same inputs, same output).

Token layout of a step: single-token chunks (decodes) first, then prefill chunks, all flattened into one
[T, heads, dim] tensor with no padding between sequences. The cache may hold a narrower dtype than the
activations (a float16 KV cache under float32 compute, see CacheConfig.kv_cache_dtype): values are rounded on
the way in and widened on the way out; int8 and int4 caches store codes and scales (cache/kv_cache.py encode) and
are decoded on the way out. Decodes run in the native paged kernel, which reads each sequence's blocks in
place (float32, float16, int8 or int4 codes), or else as one batched SDPA call: each sequence's blocks are gathered and
keys past its length are masked. Prefill chunks run one SDPA call
each, reading earlier context from the cache when the chunk follows cached tokens.
Sliding-window layers get their KV group's metadata with `window` set: block tables start at the block of
the window's first key (`PrefillSpan.key_start`), and the masks also cut keys older than the window.
On the GPU path the runner gives per-row metadata instead (`rows`: each token its own block table and key count,
as the fused CPU step has them) and one Triton kernel attends for every kind of row (kernels/gpu/attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.cache.kv_cache import TURBOQUANT, CacheSide, LayerKV, rotate, unrotate
from tokenmill.kernels import layer_ops, native


@dataclass
class PrefillSpan:
    start: int  # first row of this chunk in the step's flattened tokens
    num_tokens: int
    context_len: int  # tokens attended to by the chunk's last token (cached + this chunk)
    block_table: torch.Tensor  # [blocks] block ids of the sequence, from the block holding position key_start
    key_start: int = 0  # position of block_table's first slot (> 0 only with a sliding window)


@dataclass
class RowTables:
    """Per-row attention metadata (the GPU path): row t attends to the first lens[t] keys of tables[t]."""

    tables: torch.Tensor  # [T, max_blocks] block ids, padded with block 0; with a window, from its first block
    lens: torch.Tensor  # [T] keys up to and including row t's own, counted from its table's first slot


@dataclass
class AttentionMetadata:
    """One KV group's view of a step (see cache/kv_layout.py): its slots, block tables and window."""

    slot_mapping: torch.Tensor | None  # [T] flat cache slot of each token; None: nothing is cached (scoring)
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [decodes, max_blocks], padded with block 0; with a window,
    # each row starts at the block of the window's first position
    decode_mask: torch.Tensor | None = None  # [decodes, 1, 1, max_blocks * block_size] True = attend (window included)
    decode_seq_lens: torch.Tensor | None = None  # [decodes] int64 keys up to the new token, counted from the table's
    # first block (the native kernel's positions; it applies the window itself)
    prefills: list[PrefillSpan] = field(default_factory=list)
    window: int | None = None  # a query at position p sees keys p - window < k <= p; None: all k <= p
    rows: RowTables | None = None  # the GPU path's metadata: every row by itself (no decode or prefill fields)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KV, D]; cache: this layer's blocks."""
    if meta.rows is not None:
        return _gpu_attention(q, k, v, cache, meta, scale)
    use_native = native.enabled_for(q) and k.stride(0) == v.stride(0) and cache.k.dtype in layer_ops.CACHE_DTYPES
    recent = _recent(cache)
    if recent is not None and not use_native:
        raise ValueError("recent rows (kv_cache_recent_blocks) are written and read by the native kernels on "
                         "float32 activations only")
    if meta.slot_mapping is not None:
        if use_native:
            layer_ops.write_kv(k, v, meta.slot_mapping, *cache[:7], recent=recent)
        else:
            _store(k, cache.side(True), meta.slot_mapping)
            _store(v, cache.side(False), meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd and use_native:
        out[:nd] = layer_ops.paged_decode_attention(q[:nd], cache.k, cache.v, meta.decode_block_tables,
                                                    meta.decode_seq_lens, scale, meta.window or 0, cache.k_scale,
                                                    cache.v_scale, cache.signs, cache.codes, recent)
    elif nd:
        out[:nd] = _decode(q[:nd], cache, meta, scale)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        out[rows] = _prefill(q[rows], k[rows], v[rows], cache, span, meta.window, scale)
    return out


def _gpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV, meta: AttentionMetadata,
                   scale: float) -> torch.Tensor:
    from tokenmill.kernels.gpu import layer_ops as gpu_ops
    from tokenmill.kernels.gpu.attention import paged_attention as gpu_paged_attention

    if cache.k_scale is None and k.stride() == v.stride():  # a float cache: one kernel writes both
        gpu_ops.write_kv(k, v, meta.slot_mapping, cache.k, cache.v)
    else:
        _store(k, cache.side(True), meta.slot_mapping)
        _store(v, cache.side(False), meta.slot_mapping)
    if cache.signs is None:
        return gpu_paged_attention(q, cache.k, cache.v, meta.rows.tables, meta.rows.lens, scale, meta.window or 0,
                                   cache.k_scale, cache.v_scale)
    group = q.shape[1] // cache.k.shape[2]  # an int4 cache holds rotated rows: attend in the rotated space
    queries, values = (cache.rotation(part).repeat_interleave(group, 0) for part in (0, 2))
    out = gpu_paged_attention(rotate(q.float(), queries).to(q.dtype), cache.k, cache.v, meta.rows.tables,
                              meta.rows.lens, scale, meta.window or 0, cache.k_scale, cache.v_scale)
    return unrotate(out.float(), values).to(out.dtype)


def _recent(cache: LayerKV) -> layer_ops.RecentRowsRef | None:
    if not cache.recent_blocks:
        return None
    return layer_ops.RecentRowsRef(cache.recent_k, cache.recent_v, cache.recent_of, cache.recent_blocks)


def _store(x: torch.Tensor, side: CacheSide, slots: torch.Tensor) -> None:
    """Rows x [T, KV, D] into their slots, in the cache's element type (and scales)."""
    elements, row_scales = side.encode(x)
    stored = side.elements.view(torch.uint8) if side.elements.dtype == TURBOQUANT else side.elements
    stored.view(-1, *elements.shape[1:]).index_copy_(0, slots, elements.view(stored.dtype))
    if side.scales is not None:
        side.scales.view(-1, *row_scales.shape[1:]).index_copy_(0, slots, row_scales)


def _as_stored(x: torch.Tensor, side: CacheSide) -> torch.Tensor:
    """x as the cache would give it back: rounded to its element type (and scales), in x's dtype."""
    return side.decode(*side.encode(x), x.dtype)


def _read(side: CacheSide, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks' rows [len(blocks) * block_size, KV, D] in `dtype` (index_select: ~5x faster than fancy
    indexing), decoded."""
    rows = side.elements.index_select(0, blocks).flatten(0, 1)
    row_scales = None if side.scales is None else side.scales.index_select(0, blocks).flatten(0, 1)
    return side.decode(rows, row_scales, dtype)


def _decode(q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All single-token queries at once. The heads sharing a KV head act as that head's query rows; each
    sequence's blocks are gathered into [B, KV, max_blocks * block_size, D]."""
    b, heads, dim = q.shape
    kv_heads = cache.k.shape[2]
    tables = meta.decode_block_tables.view(-1)
    keys = _read(cache.side(True), tables, q.dtype).view(b, -1, kv_heads, dim).transpose(1, 2)
    values = _read(cache.side(False), tables, q.dtype).view(b, -1, kv_heads, dim).transpose(1, 2)
    query = q.view(b, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(b, heads, dim)


def _as_recent(x: torch.Tensor, side: CacheSide) -> torch.Tensor:
    """x as a twin of recent rows gives it back: in the cache's space (keys minus the offset, rotated), rounded to
    float16, turned back (as _as_stored, whose codes it stands in for)."""
    x = x.float() if side.offset is None else x.float() - side.offset
    if side.signs is None:
        return x.half().float()
    return unrotate(rotate(x, side.signs).half().float(), side.signs)


def _read_recent(rows: torch.Tensor, side: CacheSide, twins: torch.Tensor) -> torch.Tensor:
    """Twin blocks `twins` of one layer's recent rows ([twins, block_size, KV, D] float16) as
    [len(twins) * block_size, KV, D] float32, turned back."""
    x = rows.index_select(0, twins.clamp(min=0)).flatten(0, 1).float()
    return x if side.signs is None else unrotate(x, side.signs)


def _recent_mask(query_pos: torch.Tensor, has_twin: torch.Tensor, block_size: int, recent_blocks: int,
                 num_keys: int) -> torch.Tensor:
    """[queries, keys] True where a query reads the key from its block's twin (csrc/paged_attention.h KVCacheRef):
    the key's block is in the query's aligned group of recent_blocks blocks, up to its own, and it and every block
    after it up to the query's own has a twin. Positions count from position 0."""
    own = query_pos[:, None] // block_size
    blocks = torch.arange(len(has_twin))[None, :]
    window = (blocks <= own) & (blocks >= own // recent_blocks * recent_blocks)
    last_missing = torch.where(window & ~has_twin[None, :], blocks, -1).amax(-1, keepdim=True)
    return (window & (blocks > last_missing)).repeat_interleave(block_size, 1)[:, :num_keys]


def _attend_recent(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, twin_keys: torch.Tensor,
                   twin_values: torch.Tensor, recent: torch.Tensor, visible: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention of q [T, H, D] over keys and values [N, KV, D], each query reading the twins' rows where
    recent [T, N] and the codes' elsewhere, over the keys visible [T, N] to it."""
    group = q.shape[1] // keys.shape[1]

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.float().repeat_interleave(group, 1)

    query = q.float()
    scores = torch.where(recent, torch.einsum("thd,nhd->htn", query, heads(twin_keys)),
                         torch.einsum("thd,nhd->htn", query, heads(keys))) * scale
    weights = scores.masked_fill(~visible, -torch.inf).softmax(-1)
    out = (torch.einsum("htn,nhd->thd", weights * recent, heads(twin_values))
           + torch.einsum("htn,nhd->thd", weights * ~recent, heads(values)))
    return out.to(q.dtype)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV, span: PrefillSpan,
             window: int | None, scale: float) -> torch.Tensor:
    t = span.num_tokens
    cached = span.context_len - t
    key_side, value_side = cache.side(True), cache.side(False)
    recent_rows = cache.recent_blocks and window is None  # sliding-window layers read only codes (KVCacheRef)
    if cached == 0:  # nothing before this chunk: attend within it, to its keys as the cache holds them (as decoding
        # and the fused step read them: a prompt gives the same result whether it was cached or not)
        keys, key_start = _as_stored(k, key_side), 0
        values = _as_stored(v, value_side)
        if recent_rows:  # the chunk's twins hold what it writes
            twin_keys, twin_values = _as_recent(k, key_side), _as_recent(v, value_side)
            has_twin = torch.ones(-(-t // cache.k.shape[1]), dtype=torch.bool)
    else:
        num_keys = span.context_len - span.key_start
        keys = _read(key_side, span.block_table, q.dtype)[:num_keys]
        values = _read(value_side, span.block_table, q.dtype)[:num_keys]
        key_start = span.key_start
        if recent_rows:
            twins = cache.recent_of[span.block_table].long()
            twin_keys = _read_recent(cache.recent_k, key_side, twins)[:num_keys]
            twin_values = _read_recent(cache.recent_v, value_side, twins)[:num_keys]
            has_twin = twins >= 0
    if recent_rows:
        recent = _recent_mask(torch.arange(cached, span.context_len), has_twin, cache.k.shape[1],
                              cache.recent_blocks, len(keys))
        visible = _visible(cached, span.context_len, key_start, window, q.device)
        return _attend_recent(q, keys, values, twin_keys, twin_values, recent, visible, scale)
    if cached == 0 and (window is None or t <= window):
        mask, causal = None, True
    else:
        mask, causal = _visible(cached, span.context_len, key_start, window, q.device), False
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def _visible(cached: int, context_len: int, key_start: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] True where query position cached.. sees key position key_start.. (causal, in the window)."""
    query_pos = torch.arange(cached, context_len, device=device)[:, None]
    key_pos = torch.arange(key_start, context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
