"""Issue 7 scoreboard: speculative decoding on the default model, against no speculation and llama.cpp, one run.

Run:  python benchmarks/spec_decode.py --out benchmarks/results/spec_decode   (quiet machine; ~20 min on 2 cores)

Three workloads, greedy, chat template applied:
- grounded: rewrite / repeat / extract from a paragraph of the shipped held-out text, and a code edit (the answer
  copies much of its input: where prompt lookup should shine), up to 64 new tokens;
- grounded-long: the same prompts, up to 256 new tokens (whole rewrites instead of their first lines), at batch
  sizes up to 16 (64 x 256 tokens would take as long as the rest of the run);
- chat: the first 16 prompts of the built-in English set (open questions: little to copy), up to 64 new tokens.
For each batch size B, the workload's prompts (cycled to a multiple of B, at least all of them) go to `LLM.chat`
B at a time, one group after another: batch 1 is single-stream over every prompt, not just the first one.
Output tok/s = generated tokens / wall time. All configurations are loaded in one process; each cell runs once
untimed (so every timed run finds its prompts in the prefix cache alike and decoding dominates) and then
`--repeats` times, the configurations taking turns run by run; the median run is reported (single runs varied by
20-30% on these shared machines, and drift over minutes must not pass for a configuration's effect). Greedy output
is identical with and without speculation (tested), so every configuration generates the same tokens. llama.cpp's
single-stream decode (`llama-bench -n 64`) is the batch-1 reference; it has no speculation in these builds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path

from quantized import PEERS, llama_bench

from tokenmill import LLM, SamplingParams
from tokenmill.hardware import describe
from tokenmill.model.loader.default_model import default_model_path
from tokenmill.texts import EVAL_TEXT, builtin_prompts, shipped_text

CONFIGS = {
    "none": None,
    "ngram k=4": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    # up to 8 rows per verify: one pass of the AVX-512 kernels over the weights
    "ngram k=7": {"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "draft 8 layers k=3": {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 8},
}
PASSAGE_CHARS = 700
CODE = '''def average(values):
    total = 0
    count = 0
    for v in values:
        total = total + v
        count = count + 1
    if count == 0:
        return 0
    return total / count
'''


def grounded_prompts() -> list[str]:
    text = shipped_text(EVAL_TEXT)
    passages = [p for p in text.split("\n\n") if len(p) > 300]
    prompts = []
    for i, passage in enumerate(passages[:8]):
        passage = passage[:PASSAGE_CHARS]
        instruction = ("Rewrite the following text, keeping its wording as much as possible:",
                       "Repeat the following text exactly:",
                       "Copy the first two sentences of the following text:")[i % 3]
        prompts.append(f"{instruction}\n\n{passage}")
    prompts.append(f"Rename the variable `total` to `running_sum` in this code and show the whole code:\n\n{CODE}")
    return prompts


def chat_prompts() -> list[str]:
    return [p["prompt"] for p in builtin_prompts()[:16]]


def measure_interleaved(llms: dict[str, LLM], prompts: list, max_tokens: int, batch: int, repeats: int,
                        before_run: Callable[[LLM], None] | None = None) -> dict[str, dict]:
    """Per configuration, the median of `repeats` runs, the configurations taking turns run by run: this machine's
    speed drifts by up to 2x within an hour, and measured one after another, drift passed for a configuration
    effect (a draft model that never drafted measured 0.78x of no speculation; interleaved, the two are even)."""
    for llm in llms.values():
        measure(llm, prompts, max_tokens, batch)  # warm-up: fills the prefix cache with these prompts
    runs: dict[str, list[dict]] = {name: [] for name in llms}
    for _ in range(repeats):
        for name, llm in llms.items():
            if before_run is not None:
                before_run(llm)
            runs[name].append(measure(llm, prompts, max_tokens, batch))
    return {name: {**sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2], "all_tok_s": [r["tok_s"] for r in rs]}
            for name, rs in runs.items()}


def measure(llm: LLM, prompts: list, max_tokens: int, batch: int) -> dict:
    """prompts: user messages, or whole conversations (lists of messages)."""
    count = -(-max(batch, len(prompts)) // batch) * batch
    convs = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in islice(cycle(prompts), count)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = [out for i in range(0, count, batch) for out in llm.chat(convs[i:i + batch], params, use_tqdm=False)]
    wall = time.perf_counter() - start
    after = llm.engine.stats()
    drafts = after.spec_num_drafts - before.spec_num_drafts
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_s": tokens / wall, "tokens": tokens, "drafts": drafts,
            "draft_tokens": after.spec_num_draft_tokens - before.spec_num_draft_tokens, "accepted": accepted,
            "mean_accepted_len": 1 + accepted / drafts if drafts else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spec_decode"))
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="grounded,grounded-long,chat")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workloads = {"grounded": (grounded_prompts(), 64), "grounded-long": (grounded_prompts(), 256),
                 "chat": (chat_prompts(), 64)}
    max_batch = {"grounded-long": 16}
    workloads = {name: workloads[name] for name in args.workloads.split(",")}
    results: dict = {}
    llms = {name: LLM(speculative_config=spec) for name, spec in CONFIGS.items()}  # all loaded: runs interleave
    for llm in llms.values():
        llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    cells = [(w, b) for w in workloads for b in map(int, args.batches.split(",")) if b <= max_batch.get(w, b)]
    for workload, batch in cells:
        prompts, max_tokens = workloads[workload]
        for name, r in measure_interleaved(llms, prompts, max_tokens, batch, args.repeats).items():
            results[f"{name}|{workload}|{batch}"] = r
            print(name, workload, batch, json.dumps(r), flush=True)
    peer = (llama_bench(default_model_path(), args.out / "llama-bench.json") if (PEERS / "llama-bench").exists()
            else None)
    (args.out / "spec_decode.json").write_text(json.dumps({"cpu": describe(), "results": results, "llama_bench": peer}))
    lines = [f"CPU: {json.dumps(describe())}", "",
             "| workload | batch | no spec tok/s | " + " | ".join(f"{c} tok/s (speedup, mean accepted len)"
                                                           for c in list(CONFIGS)[1:]) + " |",
             "|---|---:|---:|" + "---:|" * (len(CONFIGS) - 1)]
    for workload, batch in cells:
        base = results[f"none|{workload}|{batch}"]["tok_s"]
        row = []
        for name in list(CONFIGS)[1:]:
            r = results[f"{name}|{workload}|{batch}"]
            length = f"{r['mean_accepted_len']:.2f}" if r["mean_accepted_len"] else "off"
            row.append(f"{r['tok_s']:.1f} ({r['tok_s'] / base:.2f}x, {length})")
        lines.append(f"| {workload} | {batch} | {base:.1f} | " + " | ".join(row) + " |")
    if peer:
        lines += ["", f"llama.cpp single stream (llama-bench tg64, same GGUF): {peer['decode']:.1f} tok/s"]
    report = "\n".join(lines)
    (args.out / "spec_decode.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    sys.exit(main())
