"""Native float32 layer kernels against plain PyTorch on random inputs (odd sizes, strided rows, paged blocks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.cache.kv_cache import quantize_int8
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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_decode_attention_matches_sdpa(window, cache_dtype):
    """A float16 cache is read exactly (widened to float32), and int8 codes times their scales are what the
    reference attends to (the kernel scales each score and each value weight instead): all meet one float32
    bound."""
    torch.manual_seed(0)
    blocks, bs, kv, heads, d = 12, 4, 2, 6, 16
    scales = [None, None]
    if cache_dtype == torch.int8:
        k_cache, v_cache = (torch.randint(-127, 128, (blocks, bs, kv, d), dtype=torch.int8) for _ in range(2))
        scales = [torch.rand(blocks, bs, kv) * 0.05 for _ in range(2)]
    else:
        k_cache, v_cache = (torch.randn(blocks, bs, kv, d).to(cache_dtype) for _ in range(2))
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11], [8, 0, 0, 0]])
    lens = torch.tensor([10, 16, 1])
    q = torch.randn(3, heads + 4, d)[:, :heads]  # strided token rows
    out = layer_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, *scales)

    def rows(cache, scale, b):
        x = cache[tables[b]].reshape(-1, kv, d)[: lens[b]].float()
        return x if scale is None else x * scale[tables[b]].reshape(-1, kv)[: lens[b], :, None]

    assert_matches_sdpa(out, q, [(rows(k_cache, scales[0], b), rows(v_cache, scales[1], b)) for b in range(3)],
                        window, 0.25, rtol=1e-5)


def assert_matches_sdpa(out: torch.Tensor, q: torch.Tensor, keys_values: list, window: int, scale: float,
                        rtol: float) -> None:
    """Each row b of the kernel's output against SDPA over its (keys, values) [len, KV, D], the last `window`."""
    for b, (keys, values) in enumerate(keys_values):
        if window:
            keys, values = keys[-window:], values[-window:]
        ref = F.scaled_dot_product_attention(q[b][:, None], keys.transpose(0, 1), values.transpose(0, 1),
                                             scale=scale, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b], ref, rtol=rtol, atol=1e-5)


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


def test_write_kv_int8_stores_what_quantize_int8_computes():
    """Per token and KV head: the native write and the PyTorch path store the same codes and scales, bit for bit
    (a zero row gets scale 0)."""
    kv_heads, d = 3, 32
    caches = [torch.zeros(4, 2, kv_heads, d, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(4, 2, kv_heads) for _ in range(2)]
    kv = torch.randn(3, 2, kv_heads, d) * torch.tensor([0.01, 1.0, 300.0])[:, None, None, None]
    kv[1, 0, 2] = 0.0
    slots = torch.tensor([5, 0, 3])
    layer_ops.write_kv(kv[:, 0], kv[:, 1], slots, caches[0], caches[1], scales[0], scales[1])
    for i in range(2):
        codes, row_scales = quantize_int8(kv[:, i])
        assert torch.equal(caches[i].view(8, kv_heads, d)[slots], codes)
        assert torch.equal(scales[i].view(8, kv_heads)[slots], row_scales)
        dequantized = codes.float() * row_scales[..., None]
        assert ((dequantized - kv[:, i]).abs() <= row_scales[..., None] / 2 * 1.0001).all()  # half a step at most
    assert scales[0].view(8, kv_heads)[0, 2] == 0 and caches[0].view(8, kv_heads, d)[0, 2].abs().sum() == 0
