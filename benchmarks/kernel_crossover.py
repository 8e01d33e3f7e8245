"""Where the native quantized kernel stops beating a float GEMM, per projection shape and row count.

Run:  python benchmarks/kernel_crossover.py --out benchmarks/results/kernel_crossover   (quiet machine, ~3 min)

For each distinct projection of the default model (fused QKV, o, fused gate/up, down, tied LM head) and each
row count, times one call per layer on all 30 layers' matrices in turn (so weights stream from memory as in a
decode step; the LM head has one matrix) for:
  kernel        quant_ops.linear on the packed (tiled) weight: what QuantizedLinear runs up to max_kernel_rows
  dequant+gemm  dequantize, then F.linear in `GEMM_DTYPE` (bf16 on native-bf16 CPUs): what it runs above
  bf16 cached   F.linear on a bf16 copy made once (2x the memory of int8, 4x of int4): what vLLM's CPU path does
  fp32 cached   F.linear on a float32 copy made once
Reports median ms per call and the fastest candidate; the CPU flags head the table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmill.hardware import describe
from tokenmill.kernels import quant_ops
from tokenmill.llm import LLM
from tokenmill.model.layers.quantized import GEMM_DTYPE, QuantizedLinear


def projections(llm: LLM) -> dict[str, list[QuantizedLinear]]:
    """Layer-name suffix -> that projection's QuantizedLinear in every layer."""
    found: dict[str, list[QuantizedLinear]] = {}
    for name, module in llm.model.named_modules():
        if isinstance(module, QuantizedLinear):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    return found


def median_ms(fn: Callable[[int], object], count: int, repeats: int) -> float:
    fn(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        times.append((time.perf_counter() - start) / count * 1e3)
    return statistics.median(times)


def candidates(layers: list[QuantizedLinear], x: torch.Tensor) -> dict[str, Callable[[int], object]]:
    weights = [[p.weight for p in m.parts] for m in layers]
    bf16 = [torch.cat([quant_ops.dequantize(w) for w in ws]).bfloat16() for ws in weights]
    fp32 = [torch.cat([quant_ops.dequantize(w) for w in ws]) for ws in weights]
    xb, xg = x.bfloat16(), x.to(GEMM_DTYPE)
    return {
        "kernel": lambda i: [quant_ops.linear(x, w) for w in weights[i]],
        "dequant+gemm": lambda i: F.linear(xg, torch.cat([quant_ops.dequantize(w) for w in weights[i]]).to(GEMM_DTYPE)),
        "bf16 cached": lambda i: F.linear(xb, bf16[i]),
        "fp32 cached": lambda i: F.linear(x, fp32[i]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,24,32,48,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="folder for crossover.md")
    args = parser.parse_args()
    llm = LLM(progress=True)
    facts = describe()
    lines = [f"CPU flags: `{facts['flags']}`; torch {facts['torch']}, {facts['threads']} threads, GEMM dtype "
             f"{str(GEMM_DTYPE).removeprefix('torch.')}", "",
             "| projection | rows | kernel | dequant+gemm | bf16 cached | fp32 cached | fastest |",
             "|---|" + "---:|" * 6]
    for name, layers in projections(llm).items():
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, layers[0].in_features)
            times = {k: median_ms(fn, len(layers), args.repeats) for k, fn in candidates(layers, x).items()}
            best = min(times, key=times.get)
            lines.append(f"| {name} {layers[0].in_features}->{layers[0].out_features} | {rows} | "
                         + " | ".join(f"{t:.3f}" for t in times.values()) + f" | {best} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n\nms per call (median of the repeats; one call per layer's matrix in turn)\n"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "crossover.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
