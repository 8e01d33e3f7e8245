"""The GPU path's paged attention against the CPU path's: decode rows, runs of rows sharing one sequence (verify and
prefill chunks), GQA, sliding windows, and float and int8 caches."""
from __future__ import annotations

import pytest
import torch

from tokenmill.cache.kv_cache import dequantize_int4, quantize_int4, quantize_int8
from tokenmill.kernels import layer_ops, native

pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")
from tokenmill.kernels.gpu.attention import paged_attention  # noqa: E402

BLOCKS, BLOCK_SIZE = 24, 16


def _reference(q, keys, values, tables, lens, scale, window):
    """Each row against its own keys, in float32: the cache's first lens[t] slots of its table (the last
    `window`)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // keys.shape[2]
    for t in range(q.shape[0]):
        slots = torch.tensor([tables[t, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(lens[t])])
        slots = slots[-window:] if window else slots
        k = keys.flatten(0, 1)[slots].float().repeat_interleave(group, 1)  # [n, heads, D]
        v = values.flatten(0, 1)[slots].float().repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[t].float(), k) * scale, -1)
        out[t] = torch.einsum("hn,nhd->hd", p, v)
    return out


def _case(heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(BLOCKS, BLOCK_SIZE, kv_heads, dim, generator=g)
    values = torch.randn(BLOCKS, BLOCK_SIZE, kv_heads, dim, generator=g)
    # three sequences: two decode rows, then a run of 5 rows of one sequence (a verify or prefill chunk)
    seqs = [torch.randperm(BLOCKS, generator=g)[:n] for n in (3, 7, 5)]
    rows = [(seqs[0], 40), (seqs[1], 100)] + [(seqs[2], 70 + i) for i in range(5)]
    width = max(len(s) for s, _ in rows)
    tables = torch.stack([torch.cat([s, torch.zeros(width - len(s), dtype=torch.long)]) for s, _ in rows])
    lens = torch.tensor([n for _, n in rows])
    q = torch.randn(len(rows), heads, dim, generator=g)
    return q, keys, values, tables, lens


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (12, 2, 128), (4, 4, 256)])
@pytest.mark.parametrize("window", [0, 20])
def test_float_cache_matches_reference_and_native(heads, kv_heads, dim, window, device):
    q, keys, values, tables, lens = _case(heads, kv_heads, dim)
    scale = dim ** -0.5
    want = _reference(q, keys, values, tables, lens, scale, window)
    got = paged_attention(q.to(device), keys.to(device), values.to(device), tables.to(device), lens.to(device),
                          scale, window).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if native.enabled_for(q):
        cpu = layer_ops.paged_decode_attention(q, keys, values, tables, lens, scale, window)
        torch.testing.assert_close(got, cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8, torch.uint8])
def test_narrow_caches(dtype, device):
    """float16, int8 and int4 codes (the int4 cache's rows are rotated ones; attention is the same in any basis, so
    random rows stand for them here; the rotation's own test is the engine's, test_engine_gpu.py)."""
    q, keys, values, tables, lens = _case(12, 2, 128, seed=1)
    scale = 128 ** -0.5
    if dtype == torch.uint8:
        (kc, ks), (vc, vs) = quantize_int4(keys), quantize_int4(values)
        want = _reference(q, dequantize_int4(kc, ks), dequantize_int4(vc, vs), tables, lens, scale, 0)
        args = dict(k_scale=ks.to(device), v_scale=vs.to(device))
    elif dtype == torch.int8:
        (kc, ks), (vc, vs) = quantize_int8(keys), quantize_int8(values)
        want = _reference(q, kc.float() * ks[..., None], vc.float() * vs[..., None], tables, lens, scale, 0)
        args = dict(k_scale=ks.to(device), v_scale=vs.to(device))
    else:
        kc, vc = keys.half(), values.half()
        want = _reference(q, kc, vc, tables, lens, scale, 0)
        args = {}
    got = paged_attention(q.to(device), kc.to(device), vc.to(device), tables.to(device), lens.to(device), scale,
                          **args).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if native.enabled_for(q) and dtype != torch.uint8:  # the native int4 reader rotates q itself
        cpu = layer_ops.paged_decode_attention(q, kc, vc, tables, lens, scale, 0, args.get("k_scale"),
                                               args.get("v_scale"))
        torch.testing.assert_close(got, cpu, rtol=1e-4, atol=1e-5)


def test_half_precision_queries(device):
    q, keys, values, tables, lens = _case(9, 3, 64, seed=2)
    want = _reference(q.half(), keys.half(), values.half(), tables, lens, 0.125, 0)
    got = paged_attention(q.half().to(device), keys.half().to(device), values.half().to(device), tables.to(device),
                          lens.to(device), 0.125).cpu()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
