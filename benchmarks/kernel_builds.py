"""The kernel builds this CPU can run, taking turns in one process: prefill and batched decode on a real model.

Run:  python benchmarks/kernel_builds.py --model qwen2.5-coder-1.5b --out benchmarks/results/kernel_builds
      (quiet machine; each build is compiled once, then swapped in between runs: the same weights, cache and
      prompts, so only the kernels differ)

Per round and build: the time to the first token of a --prompt-len prompt of random tokens (prefix caching off,
so every round prefills it all; the fused step runs it in chunks of max_num_batched_tokens rows), and a decode
of --batch sequences for --decode-tokens tokens each after a short prompt (decode steps of --batch rows).
Builds: AVX2, AVX-512 VNNI, and AVX-512 VNNI + AMX (tile products for 32 rows and more), as the CPU allows.
Reports medians; the builds give bit-identical outputs (tests/test_quantized_linear.py), checked here too.
--matmul-rows R1 R2 ...: also one product of each distinct packed matrix of the first layer and the LM head, per
row count, per build (GMAC/s), to find where a build starts to pay.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.hardware import cpu_flags, describe
from tokenmill.kernels import build, native, quant_ops
from tokenmill.model.layers.quantized import QuantizedLinear


def builds() -> dict[str, tuple[str, ...]]:
    found = {"avx2": ()}
    if build.VNNI_CPU_FLAGS <= cpu_flags():
        found["avx512-vnni"] = build.VNNI_CXXFLAGS
    if build.AMX_CPU_FLAGS | build.VNNI_CPU_FLAGS <= cpu_flags():
        found["avx512-vnni+amx"] = build.AMX_CXXFLAGS
    return found


def use(flags: tuple[str, ...]) -> None:
    native.load_library = lambda: build.load_library(flags)
    native.library.cache_clear()


def matmul_lines(llm: LLM, kinds: dict[str, tuple[str, ...]], rows: list[int], rounds: int) -> list[str]:
    """GMAC/s of one tm_linear per packed matrix shape and format (first layer, LM head), builds taking turns."""
    matrices = {}
    for name, module in llm.model.named_modules():
        if isinstance(module, QuantizedLinear):
            for part in module.parts:
                w = part.weight
                matrices.setdefault((w.kquant or f"int{w.bits}", w.out_features, w.in_features), (name, w))
    header = " | ".join(f"{name} GMAC/s" for name in kinds)
    lines = ["", f"| matrix | format | N x K | rows | {header} | best |",
             "|---|---|---|---:|" + "---:|" * len(kinds) + "---|"]
    for (fmt, n, k), (name, w) in matrices.items():
        matrix = ctypes.byref(quant_ops.QMatrix.of(w))
        for m in rows:
            x, out = torch.randn(m, k), torch.empty(m, n)
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for r in range(rounds + 1):
                for kind, flags in kinds.items():
                    lib = build.load_library(flags)
                    started = time.perf_counter()
                    lib.tm_linear(x.data_ptr(), m, matrix, out.data_ptr())
                    if r:
                        times[kind].append(time.perf_counter() - started)
            rates = {kind: m * n * k / statistics.median(t) / 1e9 for kind, t in times.items()}
            cells = " | ".join(f"{rates[kind]:.0f}" for kind in kinds)
            lines.append(f"| {name} | {fmt} | {n} x {k} | {m} | {cells} | {max(rates, key=rates.get)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--matmul-rows", type=int, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    llm = LLM(args.model, enable_prefix_caching=False)
    rng = random.Random(0)
    top = min(llm.tokenizer.vocab_size, 30000)
    prompt = {"prompt_token_ids": [rng.randrange(100, top) for _ in range(args.prompt_len)]}
    short = [{"prompt_token_ids": [rng.randrange(100, top) for _ in range(16)]} for _ in range(args.batch)]
    first = SamplingParams(temperature=0, max_tokens=1)
    decode = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    kinds = builds()
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in kinds}
    tokens: dict[str, list] = {}
    for r in range(args.rounds + 1):  # round 0 compiles and warms each build, untimed
        for name, flags in kinds.items():
            use(flags)
            started = time.perf_counter()
            out = llm.generate([prompt], first, use_tqdm=False)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            outs = llm.generate(short, decode, use_tqdm=False)
            elapsed = time.perf_counter() - started
            tokens.setdefault(name, [out[0].outputs[0].token_ids, [o.outputs[0].token_ids for o in outs]])
            if r:
                times[name]["prefill"].append(args.prompt_len / prefill)
                times[name]["decode"].append(args.batch * args.decode_tokens / elapsed)
    lines = [f"CPU: {json.dumps(describe())}", f"model: {args.model or 'default'}",
             f"| build | prefill {args.prompt_len} tok/s | decode batch {args.batch} out tok/s (incl. its prefill) |",
             "|---|---:|---:|"]
    for name in kinds:
        lines.append(f"| {name} | {statistics.median(times[name]['prefill']):.1f} | "
                     f"{statistics.median(times[name]['decode']):.1f} |")
    same = all(t == next(iter(tokens.values())) for t in tokens.values())
    lines.append(f"greedy tokens identical across builds: {same}")
    if args.matmul_rows:
        lines += matmul_lines(llm, kinds, args.matmul_rows, args.rounds)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_builds.md").write_text("\n".join(lines) + "\n")
        (args.out / "kernel_builds.json").write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
