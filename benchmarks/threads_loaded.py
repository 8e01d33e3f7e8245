"""A 32-token greedy generation with --threads 2 and 1, on a quiet machine and beside a CPU-bound process.

Run:  python benchmarks/threads_loaded.py   (on an otherwise quiet machine; ~2-10 min on 2 cores)

Each (load, threads) variant runs in its own process: one model load (the default SmolLM2-135M), a 4-token
warm-up, then --rounds timed generations of 32 tokens (EOS ignored); the median is reported. "busy" starts
`python -c 'while True: pass'` before the variant's process and stops it after, so it competes with the whole run.
Why: the fused decode step meets its OpenMP threads at barriers many times per token, so when another process
takes one of the cores, every barrier waits for the thread that lost its core (issue 17, item 9).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from tokenmill.hardware import describe


def one_variant(threads: int, rounds: int) -> None:
    """Child process: load, warm up, time `rounds` generations, print one JSON line."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(threads=threads)
    llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = llm.generate("The capital of France is", params)
        seconds.append(time.perf_counter() - start)
        assert len(out[0].outputs[0].token_ids) == 32
    print(json.dumps({"threads": threads, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        one_variant(args.child, args.rounds)
        return
    print(json.dumps(describe()))
    print(f"{'load':<6} {'threads':>7} {'median s':>9}  runs (s)")
    for load in ("quiet", "busy"):
        for threads in map(int, args.threads.split(",")):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                child = subprocess.run([sys.executable, __file__, "--child", str(threads),
                                        "--rounds", str(args.rounds)],
                                       capture_output=True, text=True, check=False)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            if child.returncode != 0:
                sys.exit(f"threads={threads} ({load}) failed:\n{child.stderr}")
            seconds = json.loads(child.stdout.splitlines()[-1])["seconds"]
            print(f"{load:<6} {threads:>7} {statistics.median(seconds):>9.3f}  "
                  f"{' '.join(f'{s:.3f}' for s in seconds)}", flush=True)


if __name__ == "__main__":
    main()
