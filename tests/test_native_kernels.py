"""Native float32 layer kernels against plain PyTorch on random inputs (odd sizes, strided rows, paged blocks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import layer_ops, native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need an AVX2 CPU and g++")


def test_rms_norm_on_strided_rows():
    x = torch.randn(5, 2, 100)[:, 0]  # rows 200 floats apart
    w = torch.randn(100)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(layer_ops.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,i", [(1, 8), (3, 13), (17, 1536)])
def test_gated_activations(t, i):
    x = torch.randn(t, 2 * i) * 4
    torch.testing.assert_close(layer_ops.act_and_mul(x), F.silu(x[:, :i]) * x[:, i:], rtol=1e-5, atol=1e-6)
    x[0, :4] = torch.tensor([-30.0, 30.0, 1e-4, 0.0])  # saturated tanh both ways, and near zero
    # PyTorch's 1 + tanh(y) loses digits where tanh(y) is near -1; the kernel's g / (1 + exp(-2y)) does not
    torch.testing.assert_close(layer_ops.act_and_mul(x, gelu=True), F.gelu(x[:, :i], approximate="tanh") * x[:, i:],
                               rtol=1e-5, atol=1e-5)


def test_rotary_in_place_is_bit_exact_with_the_reference():
    t, h, kv, d = 4, 3, 1, 64
    qkv = torch.randn(t, (h + 2 * kv) * d)
    q, k, _ = qkv.split([h * d, kv * d, kv * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kv, d)
    pos = torch.tensor([0, 7, 3, 100])
    freqs = torch.outer(torch.arange(128.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def reference(x):
        rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos[pos][:, None] + rot * sin[pos][:, None]

    want_q, want_k = reference(q.clone()), reference(k.clone())
    layer_ops.rotary_(pos, q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_decode_attention_matches_sdpa(window, cache_dtype):
    """A float16 cache is read exactly (widened to float32), so both dtypes meet the same float32 bound."""
    torch.manual_seed(0)
    blocks, bs, kv, heads, d = 12, 4, 2, 6, 16
    k_cache, v_cache = torch.randn(blocks, bs, kv, d).to(cache_dtype), torch.randn(blocks, bs, kv, d).to(cache_dtype)
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11], [8, 0, 0, 0]])
    lens = torch.tensor([10, 16, 1])
    q = torch.randn(3, heads + 4, d)[:, :heads]  # strided token rows
    out = layer_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window)
    for b in range(3):
        keys = k_cache[tables[b]].reshape(-1, kv, d)[: lens[b]].float()
        values = v_cache[tables[b]].reshape(-1, kv, d)[: lens[b]].float()
        if window:
            keys, values = keys[-window:], values[-window:]
        ref = F.scaled_dot_product_attention(q[b][:, None], keys.transpose(0, 1), values.transpose(0, 1), scale=0.25,
                                             enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_write_kv_stores_rows_in_their_slots(cache_dtype):
    """Rows land in their slots, rounded to nearest as PyTorch's own conversion rounds them."""
    k_cache, v_cache = torch.zeros(4, 2, 1, 8, dtype=cache_dtype), torch.zeros(4, 2, 1, 8, dtype=cache_dtype)
    kv = torch.randn(3, 2, 1, 8)  # [T, k|v, KV, D]: k and v strided views of one tensor
    slots = torch.tensor([5, 0, 3])
    layer_ops.write_kv(kv[:, 0], kv[:, 1], slots, k_cache, v_cache)
    assert torch.equal(k_cache.view(8, 1, 8)[slots], kv[:, 0].to(cache_dtype))
    assert torch.equal(v_cache.view(8, 1, 8)[slots], kv[:, 1].to(cache_dtype))
    assert k_cache.view(8, 1, 8)[[1, 2, 4, 6, 7]].abs().sum() == 0  # other slots untouched
