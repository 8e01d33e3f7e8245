"""The int4 KV cache (cache/kv_cache.py): a Walsh-Hadamard rotation with random signs, then 4-bit codes per group
of 32 with a float16 scale. The rotation keeps dot products; the native write stores the bytes the PyTorch
encoder computes; the native attention over the codes equals attention over the decoded rows, on both builds."""
from __future__ import annotations

import pytest
import torch

from test_native_kernels import assert_matches_sdpa
from tokenmill.cache import kv_cache
from tokenmill.hardware import cpu_flags
from tokenmill.kernels import build, layer_ops, native

needs_kernels = pytest.mark.skipif(not native.available(), reason="native kernels need an AVX2 CPU and g++")
BUILDS = [pytest.param((), id="avx2"),
          pytest.param(build.VNNI_CXXFLAGS, id="avx512-vnni",
                       marks=pytest.mark.skipif(not build.VNNI_CPU_FLAGS <= cpu_flags(), reason="no AVX512-VNNI"))]


@pytest.fixture(params=BUILDS)
def kernel_build(request, monkeypatch):
    """layer_ops on one build of the kernel library."""
    lib = build.load_library(request.param)
    monkeypatch.setattr(layer_ops, "library", lambda: lib)
    return request.param


@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_rotation_keeps_dot_products_and_inverts(d):
    torch.manual_seed(d)
    signs = kv_cache.rotation_signs(3, d)
    assert set(signs.tolist()) == {-1.0, 1.0} and torch.equal(signs, kv_cache.rotation_signs(3, d))
    assert not torch.equal(signs, kv_cache.rotation_signs(4, d))  # each layer its own signs
    q, k = torch.randn(5, d), torch.randn(7, d) * 10
    rq, rk = kv_cache.rotate(q, signs), kv_cache.rotate(k, signs)
    torch.testing.assert_close(rq @ rk.T, q @ k.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kv_cache.unrotate(rk, signs), k, rtol=1e-5, atol=1e-5)


def test_smoothed_rotation_keeps_scores_and_inverts():
    """Key smoothing folded into the rotation: queries turned by their vector, keys by theirs, give the scores of
    the plain vectors; each side turns back exactly; without factors the three vectors are the signs, so the plain
    path's arithmetic is unchanged."""
    kv_heads, d = 2, 64
    torch.manual_seed(0)
    plain = kv_cache.rotation(5, kv_heads, d)
    assert all(torch.equal(plain[part], kv_cache.rotation_signs(5, d).expand(kv_heads, d)) for part in range(3))
    turns = kv_cache.rotation(5, kv_heads, d, torch.rand(kv_heads, d) * 8 + 0.1)
    q, k, v = torch.randn(9, kv_heads, d), torch.randn(7, kv_heads, d) * 10, torch.randn(7, kv_heads, d)
    rq, rk, rv = (kv_cache.rotate(x, turns[part]) for part, x in enumerate((q, k, v)))
    torch.testing.assert_close(torch.einsum("qhd,khd->hqk", rq, rk), torch.einsum("qhd,khd->hqk", q, k),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(kv_cache.unrotate(rk, turns[1]), k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv_cache.unrotate(rv, turns[2]), v, rtol=1e-5, atol=1e-5)


def test_rotation_spreads_outlier_channels_over_the_row():
    """Why rotate: a large channel in a group sets that group's step for all its 32 values. Rotated, the row's
    energy is spread evenly over every coordinate, so with an outlier channel in each group (keys have several)
    the steps shrink and so does the error. (A lone outlier in one group is isolated by the grouping already.)"""
    x = torch.randn(256, 128)
    x[:, [5, 37, 69, 101]] *= 10.0
    signs = kv_cache.rotation_signs(0, 128)
    rotated = kv_cache.rotate(x, signs)
    assert rotated.abs().amax() < 0.5 * x.abs().amax()
    plain = kv_cache.dequantize_int4(*kv_cache.quantize_int4(x))
    turned = kv_cache.unrotate(kv_cache.dequantize_int4(*kv_cache.quantize_int4(rotated)), signs)
    assert (turned - x).pow(2).mean() < 0.5 * (plain - x).pow(2).mean()


def test_int4_codes_are_within_a_step():
    """Half a step, except where the group's extreme has an opposite of nearly its size: codes run -8..7 (the
    extreme is -8 exactly), so +|extreme| clamps to 7, one step off."""
    x = torch.randn(6, 3, 64) * torch.tensor([0.01, 1.0, 300.0])[None, :, None]
    x[0, 0] = 0.0
    codes, scales = kv_cache.quantize_int4(x)
    assert codes.shape == (6, 3, 32) and codes.dtype == torch.uint8
    assert scales.shape == (6, 3, 2) and scales.dtype == torch.float16
    back = kv_cache.dequantize_int4(codes, scales)
    step = scales.float().abs().repeat_interleave(32, -1)
    error = (back - x).abs()
    assert (error <= step * 1.001).all()
    d = scales.float().repeat_interleave(32, -1)
    in_range = (d == 0) | (x / d.where(d != 0, torch.ones_like(d)) <= 7.5)  # x / d: the code before rounding, - 8
    assert (error[in_range] <= step[in_range] / 2 * 1.001).all()
    assert (back[0, 0] == 0).all()


@needs_kernels
@pytest.mark.parametrize("smoothed", [False, True])
def test_write_kv_int4_stores_what_the_pytorch_encoder_computes(kernel_build, smoothed):
    """Per token, KV head and group of 32: the native write (rotate, then quantize) and cache/kv_cache.py's
    encode store the same codes and scales, bit for bit, on both builds (a zero row: codes 8, scale 0), with the
    plain rotation and with keys smoothed."""
    kv_heads, d = 2, 64
    smoothing = torch.rand(kv_heads, d) * 3 + 0.25 if smoothed else None
    caches = [torch.zeros(4, 2, kv_heads, d // 2, dtype=kv_cache.INT4) for _ in range(2)]
    scales = [torch.zeros(4, 2, kv_heads, d // 32, dtype=torch.float16) for _ in range(2)]
    rotation = kv_cache.rotation(1, kv_heads, d, smoothing)
    kv = torch.randn(3, 2, kv_heads, d) * torch.tensor([0.01, 1.0, 300.0])[:, None, None, None]
    kv[1, 0, 1] = 0.0
    slots = torch.tensor([5, 0, 3])
    layer_ops.write_kv(kv[:, 0], kv[:, 1], slots, caches[0], caches[1], scales[0], scales[1], rotation)
    for i in range(2):
        codes, row_scales = kv_cache.encode(kv[:, i], kv_cache.INT4, rotation[1 + i])
        assert torch.equal(caches[i].view(8, kv_heads, d // 2)[slots], codes)
        assert torch.equal(scales[i].view(8, kv_heads, d // 32)[slots], row_scales)
    assert (caches[0].view(8, kv_heads, d // 2)[0, 1] == 0x88).all()
    assert (scales[0].view(8, kv_heads, d // 32)[0, 1] == 0).all()


@needs_kernels
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("smoothed", [False, True])
def test_paged_attention_over_int4_codes_matches_attention_over_decoded_rows(kernel_build, window, smoothed):
    """The kernel attends in the rotated space straight from the codes; the reference decodes the same codes
    (dequantize, turn back by R^T) and runs SDPA: equal within float32 rounding of the two orders, both builds;
    with smoothed keys the kernel turns the queries by the smoothed vector and the reference keys back by theirs."""
    torch.manual_seed(0)
    blocks, bs, kv, heads, d = 12, 4, 2, 6, 64
    k_cache, v_cache = (torch.randint(0, 256, (blocks, bs, kv, d // 2), dtype=torch.uint8) for _ in range(2))
    scales = [(torch.rand(blocks, bs, kv, d // 32) * 0.05).half() for _ in range(2)]
    rotation = kv_cache.rotation(2, kv, d, torch.rand(kv, d) * 3 + 0.25 if smoothed else None)
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11], [8, 0, 0, 0]])
    lens = torch.tensor([10, 16, 1])
    q = torch.randn(3, heads + 4, d)[:, :heads]  # strided token rows
    out = layer_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, *scales, rotation)

    def rows(cache, scale, b, part):
        return kv_cache.decode(cache[tables[b]].reshape(-1, kv, d // 2)[: lens[b]],
                               scale[tables[b]].reshape(-1, kv, d // 32)[: lens[b]], rotation[part], torch.float32)

    assert_matches_sdpa(out, q, [(rows(k_cache, scales[0], b, 1), rows(v_cache, scales[1], b, 2)) for b in range(3)],
                        window, 0.25, rtol=1e-4)


def test_int4_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        kv_cache.check_head_dim(kv_cache.INT4, 96)
    kv_cache.check_head_dim(torch.int8, 96)


def test_int4_block_is_four_and_a_half_bits_per_element():
    assert kv_cache.bytes_per_head_row(128, kv_cache.INT4) * 8 / 128 == 4.5
    assert kv_cache.bytes_per_head_row(128, torch.float16) / kv_cache.bytes_per_head_row(128, kv_cache.INT4) > 3.5
