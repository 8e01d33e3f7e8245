"""Issue 22: how many tokens the target accepts from each draft model, and what that buys at batch 1.

Run:  python benchmarks/draft_acceptance.py --model MODEL --draft self8=layers:8 --draft ee15=DIR ... --out DIR
(a draft is NAME=layers:N, the target's own first N layers with its final norm and LM head, or NAME=DIR, a draft
checkpoint such as `tokenmill distill --method early-exit` writes, quantized as --draft-quantization says (default
int8: a float draft would read 4-8x the bytes of the target's packed layers); quiet machine, under the CPU lock)

Workloads, greedy, chat template, up to --max-tokens new tokens: chat, the 16 held-out question prompts of the
built-in set (benchmarks' chat workload), and code, its 4 held-out code prompts; distillation never trains on
either. Every configuration (no speculation, then each draft at k = --k, mode "always") is loaded in one process
and they take turns prompt by prompt, one request at a time (batch 1): acceptance comes from the engine's counters
(mean accepted length = 1 + accepted tokens per verified draft, vLLM's definition) and tok/s from the wall time of
the same runs; a first prompt per configuration warms up untimed. Greedy output is the same in every configuration
(checked here), so each generates the same tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenmill import LLM, SamplingParams
from tokenmill.bench.spec_stats import spec_decode_summary
from tokenmill.hardware import describe
from tokenmill.texts import held_out_prompts

WORKLOADS = {"chat": "question", "code": "code"}


def draft_config(spec: str, k: int, quantization: str) -> dict:
    config = {"method": "draft_model", "num_speculative_tokens": k, "mode": "always"}
    if spec.startswith("layers:"):
        return {**config, "num_layers": int(spec.removeprefix("layers:"))}
    return {**config, "model": spec, "quantization": quantization}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=SPEC")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft-quantization", default="int8", choices=["int8", "int4"])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configs = {"none": None, **{name: draft_config(spec, args.k, args.draft_quantization)
                                for name, spec in (d.split("=", 1) for d in args.draft)}}
    llms = {name: LLM(args.model, speculative_config=spec) for name, spec in configs.items()}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = []
    for workload, category in WORKLOADS.items():
        conversations = [[{"role": "user", "content": p["prompt"]}] for p in held_out_prompts(category)]
        for llm in llms.values():
            llm.chat(conversations[:1], params)
        seconds = dict.fromkeys(llms, 0.0)
        tokens = dict.fromkeys(llms, 0)
        before = {name: llm.engine.stats() for name, llm in llms.items()}
        for conversation in conversations:
            outputs = {}
            for name, llm in llms.items():
                started = time.perf_counter()
                outputs[name] = llm.chat([conversation], params)[0].outputs[0].token_ids
                seconds[name] += time.perf_counter() - started
                tokens[name] += len(outputs[name])
            if any(ids != outputs["none"] for ids in outputs.values()):
                raise SystemExit(f"greedy output differs between configurations on {conversation}")
        for name, llm in llms.items():
            spec = spec_decode_summary(before[name], llm.engine.stats()) or {}
            results.append({"workload": workload, "config": name, "tokens": tokens[name], "seconds": seconds[name],
                            "tok_s": tokens[name] / seconds[name], "drafts": spec.get("num_drafts", 0),
                            "accepted": spec.get("num_accepted_tokens", 0),
                            "acceptance_rate": spec.get("acceptance_rate"),
                            "mean_accepted_len": spec.get("mean_acceptance_length")})
            print(results[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_acceptance.json").write_text(json.dumps(
        {"cpu": describe(), "model": args.model, "drafts": args.draft, "k": args.k,
         "draft_quantization": args.draft_quantization, "results": results}, indent=1))
    base = {r["workload"]: r["tok_s"] for r in results if r["config"] == "none"}
    lines = ["| workload | draft | mean accepted length | acceptance rate | batch-1 tok/s | vs none |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        length = "" if r["mean_accepted_len"] is None else f"{r['mean_accepted_len']:.2f}"
        rate = "" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.1f}%"
        lines.append(f"| {r['workload']} | {r['config']} | {length} | {rate} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base[r['workload']]:.2f}x |")
    (args.out / "draft_acceptance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
