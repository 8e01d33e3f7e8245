"""The GPU path's one-launch layer kernels against the PyTorch ops they replace (the CPU path's module code)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, inverse_frequencies

pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")
from tokenmill.kernels.gpu import layer_ops  # noqa: E402

G = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 32), (0, 96)])
def test_rms_norm(shape, device):
    norm = RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1], generator=G)
    x = torch.randn(*shape, generator=G) * 3
    with torch.no_grad():
        want = RMSNorm.forward(norm, x.double()).float()  # the module's PyTorch ops, in float64
    got = layer_ops.rms_norm(x.to(device), norm.weight.to(device), 1e-6).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rms_norm_of_strided_head_rows(device):
    qkv = torch.randn(6, 3 * 64, generator=G)
    q = qkv[:, :128].view(6, 2, 64)  # heads of a fused projection: rows strided, as QK-norm gets them
    w = torch.randn(64, generator=G)
    want = w * (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(layer_ops.rms_norm(q.to(device), w.to(device), 1e-6).cpu(), want)


@pytest.mark.parametrize("dim", [32, 64, 80])
def test_rotary_in_place(dim, device):
    rotary = RotaryEmbedding(inverse_frequencies(dim, 10000.0, None), 256)
    qkv = torch.randn(7, 6 * dim, generator=G)
    q, k = qkv[:, :4 * dim].view(7, 4, dim), qkv[:, 4 * dim:].view(7, 2, dim)
    positions = torch.tensor([0, 1, 2, 40, 41, 200, 255])
    want_q, want_k = RotaryEmbedding.forward(rotary, positions, q.double(), k.double())  # PyTorch ops, float64
    q, k = q.to(device), k.to(device)
    layer_ops.rotary_(positions.to(device), q, k, rotary.cos.to(device), rotary.sin.to(device))
    torch.testing.assert_close(q.cpu(), want_q.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.cpu(), want_k.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
def test_act_and_mul(gelu, device):
    x = torch.randn(3, 2 * 1500, generator=G) * 4
    gate, up = x.double().chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    torch.testing.assert_close(layer_ops.act_and_mul(x.to(device), gelu).cpu(), (act * up).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv(dtype, device):
    k_cache = torch.zeros(6, 4, 2, 32, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(5, 2, 2, 32, generator=G)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([3, 0, 17, 23, 9])
    kc, vc = k_cache.to(device), v_cache.to(device)
    layer_ops.write_kv(k.to(device), v.to(device), slots.to(device), kc, vc)
    k_cache.view(-1, 2, 32)[slots] = k.to(dtype)
    v_cache.view(-1, 2, 32)[slots] = v.to(dtype)
    assert torch.equal(kc.cpu(), k_cache) and torch.equal(vc.cpu(), v_cache)
