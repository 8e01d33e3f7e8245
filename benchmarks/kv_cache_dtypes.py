"""Issue 21: KV cache element types end to end: capacity and decode speed at concurrency, against llama.cpp's
quantized caches in the same run.

Run:  python benchmarks/kv_cache_dtypes.py --out benchmarks/results/kv_cache_dtypes   (quiet machine)

For each cache type: bytes per token, blocks per GiB and the 2k-token requests that fit in 4 GiB (from the
engine's own block size); then, for B sequences of L-token prompts (each its own corpus window, prefix caching
off, so every sequence reads its own keys), the decode tok/s of the steps after every prompt is in the cache
(the tokens those steps make over their time, prefill not timed; llama-batched-bench's S_TG). The cache types take
turns at each (B, L), --repeats rounds (median). Types: float16, int8, int4, and tqB for turboquant at B bits,
each optionally +rN for N recent blocks (kv_cache_recent_blocks; without it, the engine's default); a request's
capacity counts the twins it holds at most between steps (N of them, each the pool blocks its bytes take).
llama.cpp:
`llama-batched-bench -npp L -ntg 64 -npl B -fa on -ctk T -ctv T` with T = f16, q8_0, q4_0 on the same GGUF (it has
no turboquant).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantized import PEERS  # benchmarks/ is sys.path[0] when run as a script

from tokenmill import LLM, SamplingParams
from tokenmill.bench.datasets import corpus_tokens
from tokenmill.hardware import describe
from tokenmill.model.loader.catalog import resolve_model

LLAMA_TYPES = {"float16": "f16", "int8": "q8_0", "int4": "q4_0"}
NEW_TOKENS = 64


def cache_settings(name: str) -> dict:
    """The LLM settings of a --types name: float16, int8, int4 or tqB, optionally +rN."""
    base, _, recent = name.partition("+r")
    turbo = base.startswith("tq")
    settings = {"kv_cache_dtype": "turboquant" if turbo else base, "kv_cache_bits": float(base[2:]) if turbo else None}
    return settings | ({"kv_cache_recent_blocks": int(recent)} if recent else {})


def decode_tok_s(llm: LLM, batch: int, length: int, corpus: list[int]) -> float:
    """Decode tok/s of `batch` sequences once all their `length`-token prompts are cached."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS + 1, ignore_eos=True)
    for i in range(batch):
        start = (i * 7919) % len(corpus)
        engine.add_request(f"b{batch}-l{length}-{i}-{time.monotonic_ns()}",
                           [corpus[(start + k) % len(corpus)] for k in range(length)], params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()  # prefill (and the first token): not timed
    # the first prompts to finish began decoding while the last were in prefill: count what is left
    produced = batch * (NEW_TOKENS + 1) - sum(r.num_tokens - r.num_prompt_tokens for r in scheduler.running)
    started = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return produced / (time.perf_counter() - started)


def llama_decode(gguf: Path, batch: int, length: int, cache_type: str, out: Path) -> float:
    context = batch * (length + NEW_TOKENS) + 64
    cmd = [str(PEERS / "llama-batched-bench"), "-m", str(gguf), "-t", "2", "-c", str(context), "-npp", str(length),
           "-ntg", str(NEW_TOKENS), "-npl", str(batch), "-fa", "on", "-ctk", cache_type, "-ctv", cache_type,
           "--output-format", "jsonl"]
    print("$", " ".join(cmd), flush=True)
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    out.write_text(text)
    row = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    return row["speed_tg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", nargs="+", default=["1x1024", "16x1024", "64x1024", "1x4096", "16x4096"],
                        help="BxL: B sequences of L-token prompts")
    parser.add_argument("--types", nargs="+", default=["float16", "int8", "int4", "tq3.5"],
                        help="cache types (float16 first); tqB: turboquant at B bits")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds in which the cache types take turns at each case; the median is reported")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_cache_dtypes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [tuple(map(int, re.fullmatch(r"(\d+)x(\d+)", c).groups())) for c in args.cases]
    most = max(b * (length + NEW_TOKENS + 16) for b, length in cases)
    types = args.types
    llms = {d: LLM(args.model, **cache_settings(d), enable_prefix_caching=False,
                   max_num_seqs=max(b for b, _ in cases), max_num_batched_tokens=2048,
                   max_model_len=max(length for _, length in cases) + 2 * NEW_TOKENS,
                   kv_cache_memory=2**30 + most * 2**16) for d in types}
    corpus = corpus_tokens(llms[types[0]].tokenizer)
    lines = [f"CPU: {json.dumps(describe())}", f"command: {' '.join(sys.argv)}", "",
             "| cache | bytes per token | blocks per GiB | 2k-token requests in 4 GiB |", "|---|---:|---:|---:|"]
    for name, llm in llms.items():
        info = llm.cache_info()
        per_token = info.bytes_per_block / info.block_size
        twins = llm.engine.kv_manager.recent
        blocks_2k = -(-2048 // info.block_size) + (twins.recent_blocks * twins.cost if twins else 0)
        lines.append(f"| {name} | {per_token:.0f} | {2**30 // info.bytes_per_block} | "
                     f"{4 * 2**30 // info.bytes_per_block // blocks_2k} |")
    lines += ["", "| sequences | context | engine | " + " | ".join(f"{d} decode tok/s" for d in types)
              + " | " + " | ".join(f"{d} / {types[0]}" for d in types[1:]) + " |",
              "|---:|---:|---|" + "---:|" * (2 * len(types) - 1)]
    gguf = resolve_model(args.model)
    for batch, length in cases:
        rounds = [{d: decode_tok_s(llm, batch, length, corpus) for d, llm in llms.items()}
                  for _ in range(args.repeats)]
        print(f"{batch}x{length} rounds: {rounds}", flush=True)
        ours = {d: statistics.median(r[d] for r in rounds) for d in types}
        rows = [("tokenmill", ours)]
        if not args.no_peers and PEERS.exists():
            peer_types: dict[str, str] = {}  # our column -> llama.cpp's type, each type once
            for d in types:
                t = LLAMA_TYPES.get(d.partition("+")[0])
                if t and t not in peer_types.values():
                    peer_types[d] = t
            rows.append(("llama.cpp", {d: llama_decode(gguf, batch, length, t,
                                                       args.out / f"llama_{batch}x{length}_{t}.jsonl")
                                       for d, t in peer_types.items()}))
        for engine, speeds in rows:
            lines.append(f"| {batch} | {length} | {engine} | "
                         + " | ".join(f"{speeds[d]:.1f}" if d in speeds else "-" for d in types) + " | "
                         + " | ".join(f"{speeds[d] / speeds[types[0]]:.2f}x" if d in speeds else "-"
                                      for d in types[1:]) + " |")
            print(lines[-1], flush=True)
    (args.out / f"kv_cache_dtypes_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
