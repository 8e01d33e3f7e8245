"""Quantized weights: exact GGUF repacking, RTN error bounds, native kernels against the float reference."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

from tokenmill.hardware import cpu_flags
from tokenmill.kernels import build, quant_ops
from tokenmill.model.layers import quantized
from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear
from tokenmill.quant.gguf_blocks import repack
from tokenmill.quant.packed import PackedTensor
from tokenmill.quant.weights import QuantizedWeight, quantize_rtn

needs_kernels = pytest.mark.skipif(not quant_ops.available(), reason="native kernels need an AVX2 CPU and g++")

# int8 activations (per 32 values) cost ~0.4% of the output's scale per product sum; 2% leaves margin.
KERNEL_RTOL = 0.02


# k-quant blocks have no Python quantizer: random bytes are valid blocks once their float16 scales are sane.
_K_BLOCK_SCALES = {Q.Q4_K: (144, [0, 2]), Q.Q6_K: (210, [208])}  # bytes per 256 values, offsets of f16 scales


def _gguf_tensor(qtype: Q, rows: int, cols: int, seed: int = 0) -> PackedTensor:
    rng = np.random.default_rng(seed)
    if qtype in _K_BLOCK_SCALES:
        size, offsets = _K_BLOCK_SCALES[qtype]
        blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
        for off in offsets:
            blocks[:, off:off + 2] = rng.uniform(0.001, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        return PackedTensor(blocks.reshape(rows, -1), qtype, (rows, cols))
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return PackedTensor(gguf_quantize(w, qtype), qtype, (rows, cols))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K])
def test_gguf_repacking_is_bit_exact(qtype):
    packed = _gguf_tensor(qtype, 48, 512)
    weight = repack(packed)
    assert weight.bits == {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q6_K: 6, Q.Q5_0: 5}.get(qtype, 8)
    assert torch.equal(weight.dequantize(), packed.dequantize())
    if quant_ops.available():
        assert torch.equal(quant_ops.dequantize(weight), packed.dequantize())
        rows = torch.tensor([47, 0, 9, 9])
        assert torch.equal(quant_ops.dequantize(weight, rows), packed.dequantize()[rows])
    if qtype == Q.Q4_0:  # its implicit min is stored
        assert weight.nbytes == packed.nbytes * 10 // 9
    else:
        assert weight.nbytes == packed.nbytes  # the file's own bits per weight


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0])
def test_kquant_rows_off_the_tile_expand_exactly(qtype):
    """A k-quant matrix whose rows are not a multiple of 8 cannot be tiled: it is held expanded (float32 scales),
    with the same values."""
    packed = _gguf_tensor(qtype, 44, 256)
    weight = repack(packed)
    assert weight.kquant is None and not weight.tiled
    assert torch.equal(weight.dequantize(), packed.dequantize())


def test_repack_refuses_types_without_exact_mapping():
    with pytest.raises(ValueError, match="Q5_1"):
        repack(_gguf_tensor(Q.Q5_1, 8, 64))
    with pytest.raises(ValueError, match="Q3_K"):
        repack(PackedTensor(np.zeros((8, 110), np.uint8), Q.Q3_K, (8, 256)))


@pytest.mark.parametrize("bits,group,bound", [(8, None, 1 / 254), (8, 64, 1 / 254), (4, 32, 1 / 30), (4, 128, 1 / 30)])
def test_rtn_error_is_within_half_a_step(bits, group, bound):
    w = torch.randn(64, 256)
    weight = quantize_rtn(w, bits, group)
    g = group or 256
    spread = w.view(64, -1, g)
    step = (spread.abs().amax(-1) if bits == 8 else spread.amax(-1) - spread.amin(-1))  # range one code covers * levels
    err = (weight.dequantize() - w).abs().view(64, -1, g).amax(-1)
    assert torch.all(err <= step * bound * 1.0001 + 1e-7)


def test_cat_refuses_mixed_formats():
    a, b = quantize_rtn(torch.randn(8, 64), 4, 32), quantize_rtn(torch.randn(8, 64), 8)
    with pytest.raises(ValueError, match="different formats"):
        QuantizedWeight.cat([a, b])
    both = QuantizedWeight.cat([a, quantize_rtn(torch.randn(4, 64), 4, 32)])
    assert both.shape == (12, 64)


@needs_kernels
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 96), (8, None), (8, 32), (8, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 33])
def test_kernel_matches_dequantized_reference(bits, group, rows, tiled):
    torch.manual_seed(rows)
    out_features = 40 if tiled else 37  # the row layout takes any output count
    weight = quantize_rtn(torch.randn(out_features, 384), bits, group)
    x = torch.randn(rows, 384)
    ref = x @ weight.dequantize().T
    got = quant_ops.linear(x, weight.tile() if tiled else weight)
    assert got.shape == (rows, out_features)
    assert (got - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K])
def test_kernel_on_repacked_gguf_tensors(qtype):
    weight = quant_ops.kernel_layout(repack(_gguf_tensor(qtype, 64, 512, seed=3)))
    assert weight.tiled
    x = torch.randn(3, 512)
    ref = x @ weight.dequantize().T
    assert (quant_ops.linear(x, weight) - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 9, 17, 64, 333, 600])
def test_kquant_kernel_matches_dequantized_reference(qtype, rows):
    """k-quants at their own size, every row count the engine uses (decode, verify, prefill chunks): against
    dequantize-then-matmul, and against the kernel on their expansion (bit for bit where that is tiled: Q4_K's
    expansion is plain int4 with the same float32 scales, Q5_0's int8 with the same integer sums; Q6_K's 16-groups
    keep its expansion in the row layout)."""
    weight = repack(_gguf_tensor(qtype, 72, 768, seed=rows))
    assert weight.kquant is not None
    x = torch.randn(rows, 768) * 2
    ref = x @ weight.dequantize().T
    got = quant_ops.linear(x, weight)
    assert (got - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()
    expanded = weight.untile()
    if qtype != Q.Q6_K:
        assert torch.equal(got, quant_ops.linear(x, expanded.tile()))
    else:
        assert torch.allclose(got, quant_ops.linear(x, expanded), rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.skipif(not (quant_ops.available() and build.VNNI_CPU_FLAGS <= cpu_flags()), reason="CPU lacks AVX512-VNNI")
@pytest.mark.parametrize("rows", [1, 3, 5, 7, 19])
@pytest.mark.parametrize("qtype,tiled",
                         [(Q.Q4_1, True), (Q.Q4_1, False), (Q.Q8_0, True), (Q.Q8_0, False), (Q.Q4_K, True),
                          (Q.Q6_K, True), (Q.Q6_K, False), (Q.Q5_0, True)])
def test_vnni_build_gives_bit_identical_outputs(qtype, tiled, rows):
    """The VNNI build only changes how the integer dots are formed (one row: a tile's chunk pairs in a zmm; above
    4 rows: int4 tiles in zmm pairs; 72 rows leave an odd tile for the ymm path), never their values."""
    weight = repack(_gguf_tensor(qtype, 72, 512, seed=5))
    weight = weight.tile() if tiled else weight.untile()
    x = torch.randn(rows, 512) * 3
    outs = []
    for flags in ((), build.VNNI_CXXFLAGS):
        out = torch.empty(rows, 72)
        matrix = ctypes.byref(quant_ops.QMatrix.of(weight))
        build.load_library(flags).tm_linear(x.data_ptr(), rows, matrix, out.data_ptr())
        outs.append(out)
    assert torch.equal(*outs)


@pytest.mark.skipif(not (quant_ops.available() and build.AMX_CPU_FLAGS | build.VNNI_CPU_FLAGS <= cpu_flags()),
                    reason="CPU lacks AMX")
@pytest.mark.parametrize("rows", [32, 33, 64, 100])
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0])
def test_amx_build_gives_bit_identical_outputs(qtype, rows):
    """AMX's tile products (from 32 rows for int8, 64 for the 4- and 5-bit formats; Q6_K keeps the zmm loop; whole
    16s of rows, the rest on zmm) give the VNNI build's outputs bit for bit, for every packed format (72 rows
    leave an odd tile for the ymm path)."""
    weight = repack(_gguf_tensor(qtype, 72, 512, seed=rows)).tile()
    x = torch.randn(rows, 512) * 3
    outs = []
    for flags in (build.VNNI_CXXFLAGS, build.AMX_CXXFLAGS):
        out = torch.empty(rows, 72)
        matrix = ctypes.byref(quant_ops.QMatrix.of(weight))
        build.load_library(flags).tm_linear(x.data_ptr(), rows, matrix, out.data_ptr())
        outs.append(out)
    assert build.load_library(build.AMX_CXXFLAGS).tm_amx_in_use()
    assert not build.load_library(build.VNNI_CXXFLAGS).tm_amx_in_use()
    assert torch.equal(*outs)
    ref = x @ weight.dequantize().T
    assert (outs[1] - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()


@pytest.mark.parametrize("bits,group,scale_dtype", [(4, 32, torch.float16), (4, 64, torch.float32),
                                                    (8, None, torch.float32), (8, 32, torch.float16)])
def test_tiled_layout_keeps_every_value(bits, group, scale_dtype):
    """Tiling only moves bytes (and spreads a group's scale over its 32-blocks): the same floats come out of
    PyTorch's and the native dequantization, whole or by rows, and untiling restores the codes."""
    weight = quantize_rtn(torch.randn(24, 128), bits, group, scale_dtype=scale_dtype)
    tiled = weight.tile()
    assert tiled.tiled and tiled.shape == weight.shape and tiled.group_size == 32
    assert not torch.equal(tiled.qweight, weight.qweight)
    assert torch.equal(tiled.dequantize(), weight.dequantize())
    assert torch.equal(tiled.untile().codes(), weight.codes())
    rows = torch.tensor([23, 0, 9, 9])
    assert torch.equal(tiled.dequantize(rows), weight.dequantize(rows))
    if quant_ops.available():
        assert torch.equal(quant_ops.dequantize(tiled), weight.dequantize())
        assert torch.equal(quant_ops.dequantize(tiled, rows), weight.dequantize(rows))
    both = QuantizedWeight.cat([tiled, quantize_rtn(torch.randn(8, 128), bits, group, scale_dtype=scale_dtype).tile()])
    assert torch.equal(both.dequantize()[:24], weight.dequantize())


def test_tiling_needs_whole_tiles_and_32_groups():
    assert not quantize_rtn(torch.randn(12, 64), 4, 32).can_tile
    with pytest.raises(ValueError, match="cannot tile"):
        quantize_rtn(torch.randn(12, 64), 4, 32).tile()
    with pytest.raises(ValueError, match="different formats"):
        QuantizedWeight.cat([quantize_rtn(torch.randn(8, 64), 4, 32).tile(), quantize_rtn(torch.randn(8, 64), 4, 32)])


@pytest.mark.parametrize("gemm_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_quantized_linear_agrees_across_kernel_choice(rows, gemm_dtype, monkeypatch):
    """Small batches take the int8-dot kernel, large ones dequantize + float GEMM (bfloat16 on CPUs with native
    bf16): all give the same layer within the int8-activation / bf16 rounding bound."""
    monkeypatch.setattr(quantized, "GEMM_DTYPE", gemm_dtype)
    weight = quantize_rtn(torch.randn(24, 64), 4, 32)
    layer = QuantizedLinear([weight], torch.randn(24))
    x = torch.randn(2, rows, 64)
    ref = x @ weight.dequantize().T + layer.bias
    out = layer(x)
    assert out.shape == (2, rows, 24)
    assert (out - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 40])
def test_quantized_linear_with_parts_of_different_formats(rows):
    """A fused projection of an int4 part and an int8 part (as Q4_K q/k next to Q6_K v) runs as one layer."""
    parts = [quantize_rtn(torch.randn(16, 64), 4, 32), quantize_rtn(torch.randn(8, 64), 8, None)]
    layer = QuantizedLinear(parts, torch.randn(24))
    x = torch.randn(rows, 64)
    ref = x @ torch.cat([p.dequantize() for p in parts]).T + layer.bias
    assert (layer(x) - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()


def test_quantized_embedding_looks_up_dequantized_rows():
    weight = quantize_rtn(torch.randn(50, 64), 8)
    ids = torch.tensor([[3, 0], [49, 3]])
    out = QuantizedEmbedding(weight, torch.float32)(ids)
    assert torch.equal(out, weight.dequantize()[ids])
