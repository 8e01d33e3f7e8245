"""Issue 21: how much each KV code disturbs attention, on a real model's own queries, keys and values.

Run:  python benchmarks/kv_codes_error.py [MODEL] --out benchmarks/results/kv_codes_error   (any machine load)

One uncached pass over the first --tokens tokens of the shipped held-out text records every layer's q, k and v;
then, per layer, the last 256 queries attend (causally, in float32) over keys and values as each cache code
stores them: the KL divergence of the attention weights from exact keys (how far the keys' codes move the
softmax) and the relative error of the attention output (keys and values together), averaged over layers.
Compared: int4; turboquant with keys and values at the bits given (kv_cache_bits B stores keys at B + 0.5 and
values at B - 0.5); the same key bits spent as QJL (Zandieh et al., 2024) spends them: one bit
fewer on codes plus the 1-bit signs of a Gaussian projection of the residual, read as its unbiased estimate; and
int4 and the shipped turboquant widths with keys smoothed by the engine's factors (model/kv_smoothing.py, computed
from the calibration text, not the text measured here).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import tokenmill.model.llama as llama
from tokenmill import LLM
from tokenmill.cache import kv_cache
from tokenmill.cache import turboquant as tq
from tokenmill.hardware import describe
from tokenmill.model.kv_smoothing import key_smoothing
from tokenmill.texts import EVAL_TEXT, shipped_text

QUERIES = 256


def capture(llm: LLM, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Each layer's (q, k, v, scale) of one uncached pass."""
    seen, attend = [], llama.paged_attention

    def record(q, k, v, cache, meta, scale):
        seen.append((q.clone(), k.clone(), v.clone(), scale))
        return attend(q, k, v, cache, meta, scale)

    llama.paged_attention = record
    try:
        llm.score(ids)
    finally:
        llama.paged_attention = attend
    return seen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last len(q) positions' causal attention weights [H, T, N] and outputs [T, H, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,nhd->htn", q, k) * scale
    visible = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    weights = scores.masked_fill(~visible, -math.inf).softmax(-1)
    return weights, torch.einsum("htn,nhd->thd", weights, v)


def qjl_keys(keys: torch.Tensor, signs: torch.Tensor, bits: float, layer: int) -> torch.Tensor:
    """Keys at `bits` spent as QJL spends them: codes at bits - 1, plus sign(S r) of the rotated residual r with
    S [D, D] ~ N(0, 1), decoded as sqrt(pi / 2) / D * |r| * S^T sign(S r) (a query's product with it is QJL's
    unbiased estimate of <q, r>)."""
    d = keys.shape[-1]
    code = tq.RowCode(d, bits - 1)
    rotated = kv_cache.rotate(keys, signs)
    approx = tq.dequantize(*tq.quantize(rotated, code), code)
    residual = rotated - approx
    projection = torch.randn(d, d, generator=torch.Generator().manual_seed(layer))
    sketch = torch.where(residual @ projection.T > 0, 1.0, -1.0)
    estimate = (sketch @ projection) * (math.sqrt(math.pi / 2) / d * residual.norm(dim=-1, keepdim=True))
    return kv_cache.unrotate(approx + estimate, signs)


def coded(x: torch.Tensor, dtype: torch.dtype, signs: torch.Tensor, offset: torch.Tensor | None,
          code: tq.RowCode | None) -> torch.Tensor:
    return kv_cache.decode(*kv_cache.encode(x, dtype, signs, offset, code), signs, torch.float32, code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_codes_error"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, kv_cache_memory=2**28)
    layers = capture(llm, llm.tokenizer.encode(shipped_text(EVAL_TEXT))[: args.tokens])
    offsets = llm.model.key_offsets()
    factors = key_smoothing(llm.model, llm.tokenizer, offsets)
    variants = {"int4": (kv_cache.INT4, None, None, False)}
    widths = [(3.0, 2.0), (2.5, 2.5), (3.5, 2.5), (3.0, 3.0), (4.0, 3.0), (3.5, 3.5), (4.5, 2.5), (4.0, 4.0),
              (5.0, 3.0), (4.5, 3.5)]
    for key_bits, value_bits in widths:
        variants[f"turboquant K{key_bits:g} V{value_bits:g}"] = (kv_cache.TURBOQUANT, key_bits, value_bits, False)
    for key_bits in (3.0, 4.0):
        variants[f"QJL K{key_bits - 1:g}+1 V{key_bits:g}"] = (kv_cache.TURBOQUANT, key_bits, key_bits, True)
    smoothed = {"int4, keys smoothed": (kv_cache.INT4, None, None, False)}
    for key_bits, value_bits in widths[:6:2] + [(4.0, 4.0)]:  # the shipped widths: K3 V2, K3.5 V2.5, K4 V3, K4 V4
        smoothed[f"turboquant K{key_bits:g} V{value_bits:g}, keys smoothed"] = (kv_cache.TURBOQUANT, key_bits,
                                                                               value_bits, False)
    variants |= smoothed
    totals = {name: [0.0, 0.0] for name in variants}
    for layer, (q, k, v, scale) in enumerate(layers):
        q = q[-QUERIES:]
        weights, out = attention(q, k, v, scale)
        signs = kv_cache.rotation_signs(layer, k.shape[-1])
        turned = kv_cache.rotation(layer, k.shape[1], k.shape[-1], factors[layer])[1]  # the smoothed keys' vectors
        offset = None if offsets is None else offsets[layer]
        for name, (dtype, key_bits, value_bits, qjl) in variants.items():
            key_code = key_bits and tq.RowCode(k.shape[-1], key_bits)
            value_code = value_bits and tq.RowCode(k.shape[-1], value_bits)
            if qjl:
                keys = qjl_keys(k if offset is None else k - offset, signs, key_bits, layer)
            else:
                keys = coded(k, dtype, turned if name in smoothed else signs, offset, key_code)
            keys = keys if offset is None else keys + offset
            w, o = attention(q, keys, coded(v, dtype, signs, None, value_code), scale)
            kl = (weights * (weights.clamp_min(1e-30).log() - w.clamp_min(1e-30).log())).sum(-1).mean().item()
            totals[name][0] += kl / len(layers)
            totals[name][1] += ((o - out).norm() / out.norm()).item() / len(layers)
    lines = [f"CPU: {json.dumps(describe())}", f"command: {' '.join(sys.argv)}",
             f"model: {llm.checkpoint.path}, {args.tokens} tokens of {EVAL_TEXT}, last {QUERIES} queries", "",
             "| code | attention KL (keys) | output relative error |", "|---|---:|---:|"]
    lines += [f"| {name} | {kl:.4f} | {err:.4f} |" for name, (kl, err) in totals.items()]
    name = Path(str(args.model or "smollm2-135m")).name.removesuffix(".gguf")
    (args.out / f"kv_codes_error_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
