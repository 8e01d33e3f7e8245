"""Issue 19 profile: batch-1 GEMV time per packed format over a model's matrices, and the GB/s each format's kernel
reaches; their sum bounds decode speed from the matrix kernels alone.

Run:  python benchmarks/gemv_formats.py [MODEL]   (quiet machine; default qwen2.5-coder-1.5b)
"""
from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

from tokenmill import LLM
from tokenmill.kernels import quant_ops
from tokenmill.model.layers.quantized import QuantizedLinear


def main() -> None:
    llm = LLM(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b")
    by_format: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for module in llm.model.modules():
        if not isinstance(module, QuantizedLinear):
            continue
        for part in module.parts:
            w = part.weight
            x = torch.randn(1, w.in_features)
            for _ in range(3):
                quant_ops.linear(x, w)
            times = []
            for _ in range(7):
                start = time.perf_counter()
                quant_ops.linear(x, w)
                times.append(time.perf_counter() - start)
            key = (w.kquant or f"int{w.bits}", "lm_head/embed" if w.out_features > 100_000 else "layers")
            by_format[key][0] += statistics.median(times)
            by_format[key][1] += w.nbytes
    total = sum(seconds for seconds, _ in by_format.values())
    for key, (seconds, nbytes) in sorted(by_format.items()):
        print(f"{key}: {1000 * seconds:.2f} ms per token, {nbytes / 1e6:.0f} MB, {nbytes / seconds / 1e9:.1f} GB/s")
    print(f"sum of GEMVs {1000 * total:.1f} ms -> {1 / total:.1f} tok/s upper bound from GEMVs alone")


if __name__ == "__main__":
    main()
