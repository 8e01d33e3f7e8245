"""Prefill through the fused native step against the module path (PyTorch ops, SDPA), in one process, taking turns.

Run:  python benchmarks/prefill_paths.py   (quiet machine; ~2 min on 2 cores)

Time to the first token of a prompt of N new random tokens on top of C cached ones (only the C-token prefix hits
the prefix cache), median of --rounds. The module path is what runs when the runner has no fused step
(`runner.fused = None`), as in tests/test_fused_decode.py.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from tokenmill import LLM, SamplingParams
from tokenmill.hardware import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", default="4,16,64,128,256,512")
    parser.add_argument("--cached", default="0,1024")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    llm = LLM()
    runner, rng = llm.engine.runner, random.Random(0)
    fused = runner.fused
    params = SamplingParams(temperature=0, max_tokens=1)
    times: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for cached in map(int, args.cached.split(",")):
            prefix = [rng.randrange(100, 40000) for _ in range(cached)]
            if cached:
                llm.generate([{"prompt_token_ids": prefix}], params, use_tqdm=False)  # now in the prefix cache
            for new in map(int, args.new.split(",")):
                for path, step in (("module", None), ("fused", fused)):
                    runner.fused = step
                    ids = prefix + [rng.randrange(100, 40000) for _ in range(new)]
                    start = time.perf_counter()
                    llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
                    times.setdefault((cached, new, path), []).append(time.perf_counter() - start)
    runner.fused = fused
    print(f"CPU: {describe()}\n\n| cached | new | module path ms | fused step ms | speedup |\n"
          "|---:|---:|---:|---:|---:|")
    for cached, new, path in times:
        if path == "fused":
            module = statistics.median(times[(cached, new, "module")]) * 1e3
            native = statistics.median(times[(cached, new, "fused")]) * 1e3
            print(f"| {cached} | {new} | {module:.1f} | {native:.1f} | {module / native:.2f}x |")


if __name__ == "__main__":
    main()
