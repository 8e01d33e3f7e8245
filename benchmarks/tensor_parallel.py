"""Decode speed of tensor_parallel_size N against 1 (issue 24): each setting in its own process (one
tensor-parallel engine per process), rounds interleaved, medians reported.

  python benchmarks/tensor_parallel.py --model qwen2.5-coder-1.5b --tp 1 2 --rounds 3 --out results.json

--unfused-baseline adds tp=1 with the module path (TOKENMILL_FUSED_DECODE=0), the path every tensor-parallel rank
runs, to tell the cost of splitting from the cost of leaving the fused native step.

One run: load, warm up, then batch-1 decode (128 tokens after a 64-token prompt, less the prompt and first token)
and batch-8 decode (8 distinct prompts, 64 tokens each, the whole generate); prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_run(model: str, tp: int) -> dict:
    import torch

    from tokenmill import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, kv_cache_memory=1 << 30, weight_cache=tp == 1)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 30000, (64,), generator=g).tolist()} for _ in range(9)]

    def timed(batch: list, tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(batch, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - start

    timed(prompts[:1], 8)
    first = min(timed(prompts[:1], 1) for _ in range(2))
    whole = min(timed(prompts[:1], 129) for _ in range(2))
    batch8 = timed(prompts[1:], 64)
    result = {"tp": tp, "describe": llm.describe(), "batch1_decode_tok_s": 128 / (whole - first),
              "batch8_tok_s": 8 * 64 / batch8}
    llm.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--unfused-baseline", action="store_true")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's single run
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.model, args.one)))
        return
    variants = {f"tp={tp}": (tp, {}) for tp in args.tp}
    if args.unfused_baseline:
        variants["tp=1 module path"] = (1, {"TOKENMILL_FUSED_DECODE": "0"})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (tp, env) in variants.items():
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(tp)],
                                 capture_output=True, text=True, check=True, env=os.environ | env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    summary = {tp: {key: statistics.median(r[key] for r in rs) for key in ("batch1_decode_tok_s", "batch8_tok_s")}
               | {"describe": rs[0]["describe"], "runs": rs} for tp, rs in runs.items()}
    print(json.dumps({tp: {k: v for k, v in s.items() if k != "runs"} for tp, s in summary.items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
