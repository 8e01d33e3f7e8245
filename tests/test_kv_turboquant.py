"""The turboquant KV cache (cache/turboquant.py): rotated rows coded by Lloyd-Max codebooks for the rotated
coordinates' distribution, one float16 scale per row. The codebooks are the known optimal quantizers; codes pack
and unpack exactly at every bit width; the native write stores what the PyTorch encoder computes; the native
attention over the codes equals attention over the decoded rows, on both builds."""
from __future__ import annotations

import math

import pytest
import torch

from test_kv_int4 import kernel_build, needs_kernels  # noqa: F401 (a fixture)
from test_native_kernels import assert_matches_sdpa
from tokenmill.cache import kv_cache
from tokenmill.cache import turboquant as tq
from tokenmill.kernels import layer_ops


def test_codebooks_are_the_lloyd_max_quantizers_of_a_normal_coordinate():
    """At large dim a rotated coordinate is N(0, 1) in units of |x| / sqrt(dim): Max's (1960) table."""
    known = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3439, 2.1520]}
    for bits, positive in known.items():
        centroids, bounds = tq.codebook(bits, 4096)
        torch.testing.assert_close(centroids[2 ** (bits - 1):], torch.tensor(positive), atol=2e-3, rtol=0)
        torch.testing.assert_close(centroids, -centroids.flip(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(bounds, (centroids[1:] + centroids[:-1]) / 2)


@pytest.mark.parametrize("bits", [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_codes_pack_and_unpack_exactly(bits, dim):
    code = tq.RowCode(dim, bits)
    assert code.nbytes * 8 == pytest.approx(bits * dim)
    levels = torch.tensor([2**b for _, n, b in code.parts() for _ in range(n)])
    codes = (torch.rand(5, 3, dim) * levels).long()
    packed = tq._encode_codes(codes, code)
    assert packed.shape == (5, 3, code.nbytes) and torch.equal(tq._decode_codes(packed, code), codes)


@pytest.mark.parametrize("bits", [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
def test_error_is_near_the_lloyd_max_distortion(bits):
    """On rows uniform on the sphere (what the rotation makes of any row), the relative error is the codebooks'
    distortion at the row's mix of bit widths (Lloyd-Max for N(0, 1): 0.363, 0.118, 0.0345, 0.0095, 0.0025 at
    1-5 bits),
    and the least-squares scale only lowers it."""
    torch.manual_seed(0)
    x = torch.randn(4000, 128) * 3.0
    code = tq.RowCode(128, bits)
    back = tq.dequantize(*tq.quantize(x, code), code)
    error = ((back - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
    distortion = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}
    expected = sum(n * distortion[b] for _, n, b in code.parts()) / 128
    assert 0.85 * expected < error < 1.02 * expected


def test_keys_take_half_a_bit_more_than_values():
    for bits, key, value in [(2.5, 3.0, 2.0), (3.0, 3.5, 2.5), (3.5, 4.0, 3.0), (4.0, 4.0, 4.0)]:
        turbo = tq.TurboQuant(128, bits)
        assert (turbo.key.bits, turbo.value.bits) == (key, value)
        per_element = (kv_cache.bytes_per_head_row(128, kv_cache.TURBOQUANT, turbo, True)
                       + kv_cache.bytes_per_head_row(128, kv_cache.TURBOQUANT, turbo, False)) * 8 / 256
        assert per_element == bits + 16 / 128  # plus one float16 scale per row
    with pytest.raises(ValueError, match="kv_cache_bits must be one of"):
        tq.TurboQuant(128, 2.0)


def test_capacity_at_three_and_a_half_bits():
    """4.4x float16's tokens per byte at head_dim 128 (3.625 bits per element with the row scales)."""
    turbo = tq.TurboQuant(128, 3.5)
    rows = sum(kv_cache.bytes_per_head_row(128, kv_cache.TURBOQUANT, turbo, key) for key in (True, False))
    assert 2 * kv_cache.bytes_per_head_row(128, torch.float16) / rows >= 4.4


def _caches(turbo: tq.TurboQuant, blocks: int, bs: int, kv: int):
    return ([torch.zeros(blocks, bs, kv, turbo.row_bytes(key), dtype=torch.uint8).view(kv_cache.TURBOQUANT)
             for key in (True, False)],
            [torch.zeros(blocks, bs, kv, 1, dtype=torch.float16) for _ in range(2)])


@needs_kernels
@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize("bits", tq.BITS)
def test_write_kv_turboquant_stores_what_the_pytorch_encoder_computes(bits):
    """The native write (offset, rotate, code) and encode agree: codes equal except where a coordinate sits on a
    boundary to float rounding (the row's length is summed in another order), scales within a float16 step."""
    kv_heads, d = 2, 64
    turbo = tq.TurboQuant(d, bits)
    caches, scales = _caches(turbo, 4, 2, kv_heads)
    rotation = kv_cache.rotation(1, kv_heads, d, torch.rand(kv_heads, d) * 3 + 0.25)  # keys smoothed
    offset = torch.randn(kv_heads, d)
    kv = torch.randn(3, 2, kv_heads, d) * torch.tensor([0.01, 1.0, 300.0])[:, None, None, None]
    kv[1, 0, 1] = offset[1]  # a key equal to its offset: all codes of a zero row, scale 0
    slots = torch.tensor([5, 0, 3])
    layer_ops.write_kv(kv[:, 0], kv[:, 1], slots, *caches, *scales, rotation, offset, turbo.table())
    for i, code in enumerate((turbo.key, turbo.value)):
        codes, row_scales = kv_cache.encode(kv[:, i], kv_cache.TURBOQUANT, rotation[1 + i], offset if i == 0 else None,
                                            code)
        stored = caches[i].view(torch.uint8).view(8, kv_heads, -1)[slots]
        assert (tq._decode_codes(stored, code) != tq._decode_codes(codes.view(torch.uint8), code)).float().mean() < 0.01
        torch.testing.assert_close(scales[i].view(8, kv_heads, 1)[slots], row_scales, rtol=1e-3, atol=0)
    assert (scales[0].view(8, kv_heads)[0, 1] == 0).all()


@needs_kernels
@pytest.mark.usefixtures("kernel_build")
@pytest.mark.parametrize("bits", tq.BITS)
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_over_turboquant_codes_matches_attention_over_decoded_rows(bits, window):
    """The kernel attends in the rotated space straight from the codes (centroids looked up in registers, the
    row's scale once per score and per value); the reference decodes the same codes and runs SDPA."""
    torch.manual_seed(0)
    blocks, bs, kv, heads, d = 12, 4, 2, 6, 64
    turbo = tq.TurboQuant(d, bits)
    caches = [torch.randint(0, 256, (blocks, bs, kv, turbo.row_bytes(key)), dtype=torch.uint8).view(kv_cache.TURBOQUANT)
              for key in (True, False)]
    scales = [(torch.rand(blocks, bs, kv, 1) * 0.5).half() for _ in range(2)]
    rotation = kv_cache.rotation(2, kv, d, torch.rand(kv, d) * 3 + 0.25)  # keys smoothed
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11], [8, 0, 0, 0]])
    lens = torch.tensor([10, 16, 1])
    q = torch.randn(3, heads + 4, d)[:, :heads]  # strided token rows
    out = layer_ops.paged_decode_attention(q, *caches, tables, lens, 0.25, window, *scales, rotation, turbo.table())

    def rows(i, b):
        code = (turbo.key, turbo.value)[i]
        return kv_cache.decode(caches[i].index_select(0, tables[b]).reshape(-1, kv, turbo.row_bytes(i == 0))[: lens[b]],
                               scales[i][tables[b]].reshape(-1, kv, 1)[: lens[b]], rotation[1 + i], torch.float32,
                               code)

    assert_matches_sdpa(out, q, [(rows(0, b), rows(1, b)) for b in range(3)], window, 0.25, rtol=1e-4)


def test_turboquant_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="kv_cache_dtype turboquant needs a power-of-two head_dim"):
        kv_cache.check_head_dim(kv_cache.TURBOQUANT, 96)
    assert math.isclose(tq.DEFAULT_BITS, 3.5)
