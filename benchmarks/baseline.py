"""Single-stream CPU baseline: tokenmill vs transformers, float32 and bfloat16, on the embedded SmolLM2 GGUF.

Run:  python benchmarks/baseline.py --markdown-out baseline.md   (on a quiet machine; ~minutes on 2 cores)

Why each number is measured the way it is:
- One fresh subprocess per configuration (the script re-runs itself with `--one CONFIG`, which prints one
  JSON line). Peak RSS (ru_maxrss) never goes down within a process and allocators keep freed memory, so a
  config measured after another would inherit its footprint; a cold process also makes load time honest.
- Load time is wall time from before the engine library is imported (`tokenmill` / `transformers`; torch
  itself is imported first by both and not counted) until the model is ready to generate, since an
  inference library's import cost is part of what a user waits for. The constructor-only time is kept too.
- Memory: peak RSS (ru_maxrss) and current RSS (VmRSS in /proc/self/status) right after load and again
  after all generation. Peak after generation is what the table shows: what the machine must have free.
- Same input for both engines: every prompt is tokenized once, by the parent, with tokenmill's tokenizer,
  then cut (or cycled) to exactly PROMPT_LEN ids, and the ids are handed to both engines; so tokenizer
  differences cannot change the work done. Greedy decoding, EOS ignored (tokenmill `ignore_eos=True`,
  transformers `eos_token_id=None`; not `min_new_tokens`, which edits logits), and the produced length is
  checked, so both engines do exactly the same number of forward passes.
- Prefill tok/s = PROMPT_LEN / time(generate with 1 new token): one forward over the prompt plus one
  sampling step, which is how long a user waits for the first token.
- Decode: time(generate with N+1 new tokens) - time(generate with 1 new token) is exactly N single-token
  forward passes (prefill, tokenization and per-call overhead cancel out); ms/token = that / N.
- 1 warm-up run (first-call allocations, kernel selection, lazy init), then --runs timed runs; one run
  covers all prompts and the median over runs is reported. torch.set_num_threads(2) everywhere.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIGS = ("tokenmill-float32", "tokenmill-bfloat16", "transformers-float32", "transformers-bfloat16")
PROMPT_LEN = 128
THREADS = 2
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than any scribe. Within fifty years, presses were running in more than two hundred European "
    "cities, and the price of a book fell so sharply that ordinary merchants could afford to own them.",
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven grams of "
    "dried yeast and about three hundred and fifty millilitres of warm water. Knead the dough for ten "
    "minutes until it is smooth and elastic, then cover it and leave it somewhere warm until it has doubled "
    "in size, which usually takes an hour or two depending on the temperature of the kitchen.",
    "Dear team, thank you all for your hard work during the last quarter. We shipped the new billing system "
    "on time, reduced the number of open support tickets by a third, and welcomed four new colleagues. "
    "Next month we will focus on performance: several customers have reported that the dashboard is slow "
    "to load, and we want every page to appear in under one second on an ordinary laptop.",
)


def prompt_ids(gguf: Path) -> list[list[int]]:
    """Each prompt as exactly PROMPT_LEN token ids from tokenmill's tokenizer (cycled if short, then cut)."""
    from tokenmill.model.loader import gguf as gguf_loader
    from tokenmill.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(gguf_loader.read_metadata(gguf_loader.open_gguf(gguf)))
    result = []
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        while len(ids) < PROMPT_LEN:
            ids += tokenizer.encode(" " + text, add_special_tokens=False)
        result.append(ids[:PROMPT_LEN])
    return result


def rss_mib() -> dict[str, float]:
    """Peak RSS (ru_maxrss, KiB on Linux) and current RSS (VmRSS), in MiB."""
    current = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "current": current / 1024}


def load(config: str, gguf: Path) -> tuple[Callable[[list[int], int], list[int]], float]:
    """Build the engine; return generate(ids, n_new) -> new ids, and the constructor-only seconds."""
    engine, dtype_name = config.split("-")
    if engine == "tokenmill":
        from tokenmill import LLM, SamplingParams

        llm = LLM(model=gguf, dtype=dtype_name)

        def generate(ids: list[int], n: int) -> list[int]:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            return llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids

        return generate, llm.load_seconds
    import transformers  # tokenmill is never imported here, so it adds nothing to this process

    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype_name)).eval()
    built = time.perf_counter() - started

    def generate(ids: list[int], n: int) -> list[int]:
        input_ids = torch.tensor([ids])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()

    return generate, built


def run_one(config: str, gguf: Path, all_ids: list[list[int]], new_tokens: int, runs: int) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    generate, constructor_s = load(config, gguf)
    load_s = time.perf_counter() - started
    after_load = rss_mib()

    def timed(ids: list[int], n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = generate(ids, n)
        elapsed = time.perf_counter() - t0
        if len(out) != n:
            raise RuntimeError(f"{config}: asked for {n} new tokens, got {len(out)}")
        return elapsed, out

    prefill_tps, decode_ms = [], []
    first_ids: list[list[int]] = []
    for run in range(runs + 1):  # run 0 is the warm-up
        t_first = t_full = 0.0
        for ids in all_ids:
            t1, _ = timed(ids, 1)
            tn, out = timed(ids, new_tokens + 1)
            t_first, t_full = t_first + t1, t_full + tn
            if run == 0:
                first_ids.append(out[:8])
        if run > 0:
            prefill_tps.append(PROMPT_LEN * len(all_ids) / t_first)
            decode_ms.append(1000 * (t_full - t_first) / (new_tokens * len(all_ids)))
    ms = statistics.median(decode_ms)
    return {
        "config": config, "load_s": load_s, "constructor_s": constructor_s,
        "rss_after_load_mib": after_load, "rss_after_generate_mib": rss_mib(),
        "prefill_tok_s": statistics.median(prefill_tps), "decode_ms_per_token": ms, "decode_tok_s": 1000 / ms,
        "runs": {"prefill_tok_s": prefill_tps, "decode_ms_per_token": decode_ms},
        "first_output_ids": first_ids, "threads": torch.get_num_threads(),
    }


def child(config: str, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one config in a fresh interpreter; GGUF path + prompt ids go in on stdin, one JSON line comes back."""
    cmd = [sys.executable, __file__, "--one", config, "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from tokenmill.hardware import describe

    facts = describe()
    lines = [
        "# tokenmill single-stream baseline", "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- torch {torch.__version__}; CPU {facts['cpu']} ({facts['torch_capability']}), {THREADS} threads",
        f"- CPU flags: {facts['flags']}",
        f"- {len(PROMPTS)} prompts x {PROMPT_LEN} token ids (tokenmill's tokenizer, same ids for both engines), "
        f"greedy, EOS ignored, {args.new_tokens} decode tokens; 1 warm-up + {args.runs} timed runs, median",
        "- prefill tok/s = prompt tokens / time(1 new token); decode ms/token = "
        f"[time({args.new_tokens + 1} new) - time(1 new)] / {args.new_tokens}",
        "- load s: wall time from importing the engine library to a ready model, in a fresh process; "
        "peak RSS: ru_maxrss after generation, each config in its own process", "",
        "| config | load s | peak RSS MiB | prefill tok/s | decode tok/s | ms/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['config']} | {r['load_s']:.2f} | {r['rss_after_generate_mib']['peak']:.0f} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_ms_per_token']:.2f} |")
    lines += ["", "Raw results (one JSON line per config):", "", "```"]
    lines += [json.dumps(r) for r in results] + ["```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=128, help="decode tokens measured after the first")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after 1 warm-up; the median is reported")
    parser.add_argument("--markdown-out", type=Path, help="also write the markdown report here")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()
    if args.new_tokens < 1 or args.runs < 1:
        parser.error("--new-tokens and --runs must be at least 1")
    if args.one:
        job = json.loads(sys.stdin.read())
        print(json.dumps(run_one(args.one, Path(job["gguf"]), job["ids"], args.new_tokens, args.runs)), flush=True)
        return

    from tqdm import tqdm

    torch.set_num_threads(THREADS)
    from tokenmill.model.loader.default_model import default_model_path

    gguf = default_model_path()
    job = {"gguf": str(gguf), "ids": prompt_ids(gguf)}
    results = []
    for config in (bar := tqdm(args.configs, desc="configs", unit="config")):
        bar.set_postfix_str(config)
        results.append(child(config, job, args))
    text = report(results, args)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text)


if __name__ == "__main__":
    main()
