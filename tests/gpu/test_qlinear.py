"""The quantized matmul and row dequantization of the GPU path against the CPU path's exact dequantization, for
every packed format a GGUF file or tokenmill's quantizers give."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from test_quantized_linear import _gguf_tensor
from tokenmill.quant.gguf_blocks import repack
from tokenmill.quant.gpu_layout import GpuWeight, gpu_layout
from tokenmill.quant.weights import QuantizedWeight, quantize_rtn

pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")
from tokenmill.kernels.gpu import qlinear  # noqa: E402


def _weights() -> dict[str, QuantizedWeight]:
    rng = torch.Generator().manual_seed(0)
    w = torch.randn(48, 512, generator=rng)
    out = {q.name: repack(_gguf_tensor(q, 48, 512)) for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K)}
    out["Q5_0 untiled"] = repack(_gguf_tensor(Q.Q5_0, 44, 512))  # rows off the tile: expanded int8 codes
    out["Q6_K untiled"] = repack(_gguf_tensor(Q.Q6_K, 44, 512))  # int8 codes with 16-groups
    out["int4 g64"] = quantize_rtn(w, 4, 64)
    out["int8 channel"] = quantize_rtn(w, 8)
    out["int4 tiled"] = quantize_rtn(w, 4, 32).tile()
    return out


WEIGHTS = _weights()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_gpu_layout_keeps_the_file_size_and_every_value(name, device):
    w = WEIGHTS[name]
    g = gpu_layout(w)
    assert isinstance(g, GpuWeight) and (g.out_features, g.in_features) == w.shape
    if w.kquant is not None:
        assert g.nbytes <= w.nbytes * 1.04  # the same bits per weight (q4_k: codes in whole bytes)
    ids = torch.tensor([0, 7, w.out_features - 1, 7])
    got = qlinear.dequantize(g.to(device), ids.to(device)).cpu()
    assert torch.equal(got, w.dequantize()[ids])


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("rows,split", [(1, None), (3, 2), (40, 1)])
def test_qlinear_matches_the_dequantized_product(name, rows, split, device):
    w = WEIGHTS[name]
    x = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(rows))
    want = x @ w.dequantize().T
    got = qlinear.linear(x.to(device), gpu_layout(w).to(device), split=split).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("split", [1, 2])
def test_bias_and_output_dtype(split, device):
    """The bias added in float32 and the sum rounded once to the output dtype, split or not."""
    w = WEIGHTS["Q6_K"]
    g = torch.Generator().manual_seed(3)
    x, bias = torch.randn(3, w.in_features, generator=g), torch.randn(w.out_features, generator=g)
    want = (x @ w.dequantize().T + bias).half()
    got = qlinear.linear(x.to(device), gpu_layout(w).to(device), bias.to(device), torch.float16, split=split).cpu()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_half_precision_activations(device):
    w = WEIGHTS["Q4_K"]
    x = torch.randn(5, w.in_features, generator=torch.Generator().manual_seed(1))
    want = x.half().float() @ w.dequantize().half().float().T
    got = qlinear.linear(x.half().to(device), gpu_layout(w).to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
