"""Issue 23 scoreboard: suffix decoding, prompt lookup (n-gram) and their per-request mix against no speculation, on
work that repeats text.

Run:  python benchmarks/suffix_decode.py --model qwen2.5-coder-1.5b --out benchmarks/results/suffix_decode_qwen
      (quiet machine; --model omitted: the default model)

Workloads, greedy, chat template applied:
- code-edit: a small change to a source file of this repository (rename, add a docstring), "show the whole file";
- rag: a question on a passage of the shipped held-out text, to be answered from it;
- multi-turn: the model's own answer to a coding question, then "add a docstring and show it again";
- chat: open questions from the built-in prompt set (little to copy).
Configurations are all loaded in one process and take turns run by run (spec_decode.measure_interleaved: a
warm-up run, then `--repeats` timed runs each, median reported). The suffix proposer's cache of finished outputs
is emptied before every run: the same requests run again and again here, and their own earlier answers would turn
speculation into a result cache; within a run, later requests do see earlier (different) requests' outputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spec_decode import measure_interleaved
from tokenmill import LLM, SamplingParams
from tokenmill.engine.spec_decode.suffix import SuffixProposer
from tokenmill.hardware import describe
from tokenmill.texts import EVAL_TEXT, builtin_prompts, shipped_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "none": None,
    "ngram k=7": {"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "suffix k=16": {"method": "suffix", "num_speculative_tokens": 16},
    "mix k=16": {"method": "mix", "num_speculative_tokens": 16, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
}
EDITS = [
    ("src/tokenmill/engine/spec_decode/metrics.py",
     "Rename the method `observe` to `record` and show the whole file."),
    ("src/tokenmill/engine/spec_decode/proposer.py",
     "Add a one-line comment above the class Draft saying what it holds, and show the whole file."),
]
QUESTIONS = ["What does the document say happened first? Answer with sentences copied from it.",
             "Summarise the document in its own words, copying its key sentences."]
FIRST_TURN = ["Write a short Python function that checks whether a number is prime.",
              "Write a short Python function that reverses the words of a sentence."]


def code_edit() -> list[list[dict]]:
    return [[{"role": "user", "content": f"{instruction}\n\n```python\n{(ROOT / path).read_text()}```"}]
            for path, instruction in EDITS]


def rag() -> list[list[dict]]:
    text = shipped_text(EVAL_TEXT)
    passages = [p[:1200] for p in text.split("\n\n") if len(p) > 600]
    return [[{"role": "user", "content": f"Document:\n{passage}\n\nQuestion: {question}"}]
            for passage, question in zip(passages[2:], QUESTIONS)]


def multi_turn(llm: LLM) -> list[list[dict]]:
    """The model's own first answers (greedy, computed once) followed by a request to repeat them changed."""
    firsts = [[{"role": "user", "content": q}] for q in FIRST_TURN]
    answers = llm.chat(firsts, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)
    return [conv + [{"role": "assistant", "content": a.outputs[0].text},
                    {"role": "user", "content": "Add a docstring to that function and show the whole function again."}]
            for conv, a in zip(firsts, answers)]


def chat() -> list[list[dict]]:
    return [[{"role": "user", "content": p["prompt"]}] for p in builtin_prompts()[:6]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/suffix_decode"))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="code-edit,rag,multi-turn,chat")
    parser.add_argument("--max-tokens", type=int, default=256, help="code-edit and multi-turn (rag, chat: half)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llms = {name: LLM(args.model, speculative_config=spec) for name, spec in CONFIGS.items()}
    for llm in llms.values():
        llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    full, half = args.max_tokens, args.max_tokens // 2
    workloads = {"code-edit": (code_edit(), full), "rag": (rag(), half),
                 "multi-turn": (multi_turn(llms["none"]), full), "chat": (chat(), half)}
    results: dict = {}
    cells = [(w, b) for w in args.workloads.split(",") for b in map(int, args.batches.split(","))]
    for workload, batch in cells:
        convs, max_tokens = workloads[workload]
        for name, r in measure_interleaved(llms, convs, max_tokens, batch, args.repeats, _forget_outputs).items():
            results[f"{name}|{workload}|{batch}"] = r
            print(name, workload, batch, json.dumps(r), flush=True)
    (args.out / "suffix_decode.json").write_text(json.dumps({"cpu": describe(), "model": args.model,
                                                             "results": results}))
    names = list(CONFIGS)[1:]
    lines = [f"CPU: {json.dumps(describe())}", f"model: {args.model or 'default'}", "",
             "| workload | batch | no spec tok/s | " + " | ".join(f"{c} tok/s (speedup, mean accepted len)"
                                                           for c in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for workload, batch in cells:
        base = results[f"none|{workload}|{batch}"]["tok_s"]
        row = []
        for name in names:
            r = results[f"{name}|{workload}|{batch}"]
            length = f"{r['mean_accepted_len']:.2f}" if r["mean_accepted_len"] else "off"
            row.append(f"{r['tok_s']:.1f} ({r['tok_s'] / base:.2f}x, {length})")
        lines.append(f"| {workload} | {batch} | {base:.1f} | " + " | ".join(row) + " |")
    report = "\n".join(lines)
    (args.out / "suffix_decode.md").write_text(report + "\n")
    print(report)


def _forget_outputs(llm: LLM) -> None:
    speculator = llm.engine.speculator
    for proposer in speculator.proposers.values() if speculator is not None else ():
        if isinstance(proposer, SuffixProposer):
            proposer.cache.clear()


if __name__ == "__main__":
    sys.exit(main())
