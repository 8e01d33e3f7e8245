"""Issue 20: what structured output costs per token, at batch 1 and 16, against the same requests unconstrained.

Run:  python benchmarks/structured_output.py --out benchmarks/results/structured_output   (quiet machine)

Each request samples (temperature 0.8, its own seed) exactly --tokens tokens: unconstrained with ignore_eos, or
under a JSON schema that cannot close sooner (an array of at least --tokens strings), so both variants run the same
number of steps. A batch is B such requests submitted together to `LLM.generate`. The variants take turns, each
timed --repeats times after an untimed run (which also builds llguidance's view of the vocabulary, once per model);
the median is reported. Overhead = constrained step time / unconstrained step time - 1: the mask (computed per
sequence by llguidance each step) plus applying it and sampling from the masked row instead of a plain argmax or
draw.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.hardware import describe


def run(llm: LLM, batch: int, tokens: int, constrained: bool, seed: int) -> float:
    """Seconds for one batch."""
    spec = (StructuredOutputsParams(json={"type": "array", "items": {"type": "string"}, "minItems": tokens})
            if constrained else None)
    params = [SamplingParams(temperature=0.8, seed=seed + i, max_tokens=tokens, ignore_eos=not constrained,
                             structured_outputs=spec) for i in range(batch)]
    prompts = ["List some words as a JSON array of strings:"] * batch
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs), "a request stopped early"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"CPU: {json.dumps(describe())}", f"command: {' '.join(sys.argv)}", "",
             "| model | batch | unconstrained ms/step | JSON schema ms/step | overhead | "
             "unconstrained tok/s | JSON schema tok/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.models:
        llm = LLM(name)
        for batch in args.batch:
            times: dict[bool, list[float]] = {False: [], True: []}
            for constrained in (False, True):
                run(llm, batch, args.tokens, constrained, seed=0)  # untimed
            for repeat in range(args.repeats):
                for constrained in (False, True):
                    times[constrained].append(run(llm, batch, args.tokens, constrained, seed=100 * repeat))
            plain, masked = (statistics.median(times[c]) for c in (False, True))
            lines.append(f"| {name} | {batch} | {1000 * plain / args.tokens:.1f} | {1000 * masked / args.tokens:.1f} "
                         f"| {100 * (masked / plain - 1):+.0f}% | {batch * args.tokens / plain:.0f} | "
                         f"{batch * args.tokens / masked:.0f} |")
            print(lines[-1], flush=True)
    (args.out / "structured_output.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
