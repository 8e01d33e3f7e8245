"""Issue 21: decode attention over float16, int8, int4 and turboquant (2.5-4 bits) KV caches, the kernel alone, at
Qwen2.5-1.5B's head shape.

Run:  python benchmarks/kv_attention.py --out benchmarks/results/kv_attention   (quiet machine)

One layer's paged decode attention (12 query heads over 2 KV heads of 128 dims, blocks of 16, each sequence's
blocks scattered through the pool) for B sequences of L cached tokens each, timed with the cache types taking
turns (median of --repeats after a warm-up); the cache bytes each call streams are reported with the rate they
imply. A whole step reads this for each of the model's 28 layers besides the weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenmill.cache.kv_cache import ROTATED, TURBOQUANT, bytes_per_head_row, encode, resolve_kv_dtype, rotation
from tokenmill.cache.turboquant import TurboQuant
from tokenmill.hardware import describe
from tokenmill.kernels import layer_ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 2, 128, 16


def caches(batch: int, length: int, dtype: torch.dtype, turbo: TurboQuant | None, seed: int = 0):
    """Random keys and values as the cache holds them (with the rotation's vectors and turboquant's codes), block
    tables scattered over the pool, and the bytes of K and V the call streams."""
    blocks_per_seq = length // BLOCK
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq)
    lens = torch.full((batch,), length, dtype=torch.int64)
    turns = rotation(0, KV_HEADS, HEAD_DIM) if dtype in ROTATED else None
    (kc, ks), (vc, vs) = (encode(x, dtype, None if turns is None else turns[part], None, code)
                          for part, x, code in ((1, k, turbo and turbo.key), (2, v, turbo and turbo.value)))
    row_bytes = sum(bytes_per_head_row(HEAD_DIM, dtype, turbo, key) for key in (True, False))
    nbytes = num_blocks * BLOCK * KV_HEADS * row_bytes
    return (kc, vc, ks, vs, turns, turbo and turbo.table()), tables, lens, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--length", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_attention"))
    parser.add_argument("--types", nargs="+", default=["float16", "int8", "int4", "tq2.5", "tq3", "tq3.5", "tq4"],
                        help="cache types; tqB: turboquant at B bits")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes = {name: (TURBOQUANT, TurboQuant(HEAD_DIM, float(name[2:]))) if name.startswith("tq")
              else (resolve_kv_dtype(name, torch.float32, True), None) for name in args.types}
    compressed = [n for n in dtypes if n != "float16"]
    lines = [f"CPU: {json.dumps(describe())}", f"command: {' '.join(sys.argv)}", "",
             "| sequences | context | " + " | ".join(f"{n} ms | {n} GB/s" for n in dtypes)
             + "".join(f" | {n} speed-up" for n in compressed) + " |",
             "|---:|---:|" + "---:|---:|" * len(dtypes) + "---:|" * len(compressed)]
    for batch in args.batch:
        for length in args.length:
            setups = {name: caches(batch, length, *spec) for name, spec in dtypes.items()}
            q = torch.randn(batch, HEADS, HEAD_DIM)
            times: dict[str, list[float]] = {name: [] for name in dtypes}
            for repeat in range(args.repeats + 1):
                for name, (cache, tables, lens, _) in setups.items():
                    k, v, ks, vs, signs, codes = cache
                    start = time.perf_counter()
                    layer_ops.paged_decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, 0, ks, vs, signs, codes)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
            cells, medians = [], {}
            for name, (*_, nbytes) in setups.items():
                medians[name] = statistics.median(times[name])
                cells.append(f"{1000 * medians[name]:.2f} | {nbytes / medians[name] / 1e9:.1f}")
            lines.append(f"| {batch} | {length} | " + " | ".join(cells)
                         + "".join(f" | {medians['float16'] / medians[n]:.2f}x" for n in compressed) + " |")
            print(lines[-1], flush=True)
    (args.out / "kv_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
