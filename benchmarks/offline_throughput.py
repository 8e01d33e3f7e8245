"""Engine-core benchmark: offline batch throughput, peak KV use, KV capacity and prefix-cache TTFT.

Run:  python benchmarks/offline_throughput.py --markdown-out offline.md   (quiet machine; --quick: smoke test)

- Workload: benchmarks/data/english.txt (varied English prose), tokenized once by the parent with tokenmill's
  tokenizer. Each request takes a window of that token stream (wrapping) at a random offset distinct across all
  batches (one seeded draw), prompt length uniform 64..512, output uniform 64..256. Both engines get these ids.
- Throughput: all C requests submitted at once, greedy, EOS ignored, C = 1, 8, 32, 64; wall time from
  submission to the last token. Output tok/s = generated / s, total tok/s = (prompt + generated) / s.
  tokenmill: `LLM.generate` (defaults: prefix caching on, block 16, max_num_batched_tokens 512); at the
  largest C the same loop written out (add_request all, step() until done) to read `engine.stats()` after
  every step: peak kv_blocks_used/total and the kv_utilization at that step.
  transformers: one batched `generate` per batch, left padding + attention_mask, do_sample=False,
  eos_token_id=None, max_new_tokens = the batch's largest output length, so every row is computed that far;
  only each request's own output length counts as useful tokens.
- One fresh subprocess per engine and dtype (`--one CONFIG`, one JSON line back), a small warm-up generate
  first, torch.set_num_threads(2). Produced lengths are checked.
- Capacity: a 1024 + 128-token request needs ceil(1152 / block_size) blocks; N = floor(4 GiB / bytes_per_block)
  // that. Checked on `LLM(kv_cache_memory=4 GiB)`: the pool has that many blocks, one schedule() admits N
  1024-token requests (max_tokens=1; no forward pass), each then grows to 1152 tokens in the KV manager, and
  the blocks left cannot hold another.
- TTFT: on a fresh engine (same weights), A = 1000-token prefix + 20 tokens runs to completion (max_tokens=1),
  then B = the same prefix + 30 other tokens; TTFT(B) = first_token_time - arrival_time. Median of 3 fresh
  engines each, prefix caching on and off.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from tokenmill import LLM, SamplingParams
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.outputs import RequestOutput

Requests = list[tuple[list[int], int]]  # (prompt ids, output tokens) per request
CONFIGS = ("tokenmill-float32", "tokenmill-bfloat16", "transformers-float32", "transformers-bfloat16")
THREADS = 2
TEXT = Path(__file__).parent / "data" / "english.txt"
GiB = 2**30
FULL = {"prompt": (64, 512), "output": (64, 256), "prefix": 1000, "cap_prompt": 1024, "cap_output": 128}
QUICK = {"prompt": (16, 48), "output": (4, 12), "prefix": 200, "cap_prompt": 1024, "cap_output": 128}


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenize the corpus once and draw every batch's (prompt ids, output length) from seeded RNGs."""
    from tokenmill.model.loader import gguf as gguf_loader
    from tokenmill.model.loader.default_model import default_model_path
    from tokenmill.model.tokenizer import Tokenizer
    gguf = default_model_path()
    tokenizer = Tokenizer.from_gguf_metadata(gguf_loader.read_metadata(gguf_loader.open_gguf(gguf)))
    corpus = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    sizes = QUICK if args.quick else FULL
    rng = random.Random(args.seed)
    offsets = iter(rng.sample(range(len(corpus)), sum(args.concurrency)))  # all distinct: no shared prefixes
    batches = {str(c): [[[corpus[(o + k) % len(corpus)] for k in range(rng.randint(*sizes["prompt"]))],
                         rng.randint(*sizes["output"])] for o in islice(offsets, c)] for c in args.concurrency}
    p, stream = sizes["prefix"], corpus * (1 + (sizes["prefix"] + 130) // len(corpus))  # wraps around if short
    return {"gguf": str(gguf), "corpus_tokens": len(corpus), "sizes": sizes, "batches": batches,
            "prefix": stream[:p], "suffix_a": stream[p:p + 20], "suffix_b": stream[p + 100:p + 130],
            "max_num_batched_tokens": args.max_num_batched_tokens}


def greedy(n: int) -> SamplingParams:
    from tokenmill import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run_engine(engine: LLMEngine, requests: Requests, sample_stats: bool) -> tuple[list[RequestOutput], Any]:
    """LLM.generate's own loop, written out: add every request, step() until done, stats after each step."""
    for i, (ids, n) in enumerate(requests):
        engine.add_request(str(i), ids, greedy(n))
    finished, peak = {}, None
    while engine.has_unfinished():
        finished |= {out.request_id: out for out in engine.step() if out.finished}
        stats = engine.stats() if sample_stats else None
        if stats and (peak is None or stats.kv_blocks_used > peak.kv_blocks_used):
            peak = stats
    result = {"at_peak": asdict(peak), "final": asdict(engine.stats())} if peak else None
    return [finished[str(i)] for i in range(len(requests))], result


def capacity(gguf: str, dtype_name: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """How many 1024+128-token requests fit in 4 GiB, by arithmetic, checked on LLM(kv_cache_memory=4 GiB)."""
    from tokenmill import LLM
    from tokenmill.cache.kv_cache import bytes_per_block
    block, tokens = 16, sizes["cap_prompt"] + sizes["cap_output"]
    llm = LLM(model=gguf, dtype=dtype_name, kv_cache_memory=4 * GiB, block_size=block, enable_prefix_caching=False)
    cfg, kv, sched = llm.config, llm.engine.kv_manager, llm.engine.scheduler
    bpb = bytes_per_block(cfg, block, llm.dtype)
    blocks, per_req = 4 * GiB // bpb, math.ceil(tokens / block)
    n = blocks // per_req
    sched.config.max_num_batched_tokens = sizes["cap_prompt"] * n  # admit all of them in one step
    rng = random.Random(0)  # distinct random prompts, caching off: nothing shared
    for i in range(n):
        llm.engine.add_request(str(i), [rng.randrange(cfg.vocab_size) for _ in range(sizes["cap_prompt"])],
                               greedy(1))
    sched.schedule()  # allocates the prompt blocks; no forward pass is run
    admitted, grown = len(sched.running), all(kv.allocate(r, tokens) for r in sched.running)
    return {"bytes_per_block": bpb, "num_blocks": blocks, "blocks_per_request": per_req, "max_requests": n,
            "admitted": admitted, "grown_to_full": grown, "free_after": kv.pool.num_free,
            "verified": (kv.pool.num_blocks == blocks and kv.blocks_needed(tokens) * n <= kv.pool.num_blocks
                         and admitted == n and grown and kv.pool.num_free < per_req),
            "formula": f"bytes_per_block = 2 (K,V) x {cfg.num_layers} layers x {block} tokens x {cfg.num_kv_heads} "
                       f"kv heads x {cfg.head_dim} head_dim x {llm.dtype.itemsize} B = {bpb}; blocks = floor(4 GiB / "
                       f"{bpb}) = {blocks}; per request ceil({tokens} / {block}) = {per_req}; "
                       f"N = floor({blocks} / {per_req}) = {n}"}


def ttft(llm: LLM, job: dict[str, Any], reps: int = 3) -> dict[str, Any]:
    """TTFT of B (shared prefix with A, which ran first) on fresh engines, prefix caching on vs off."""
    from tokenmill.config import CacheConfig, SchedulerConfig
    from tokenmill.engine.engine import LLMEngine
    result: dict[str, Any] = {}
    for caching in (True, False):
        runs = []  # (TTFT seconds, prompt tokens served from the prefix cache) per fresh engine
        for _ in range(reps):
            engine = LLMEngine(llm.model, llm.tokenizer, llm.dtype, CacheConfig(16, 4 * GiB, caching),
                               SchedulerConfig(max_num_batched_tokens=job["max_num_batched_tokens"]))
            run_engine(engine, [(job["prefix"] + job["suffix_a"], 1)], False)
            (b,), _ = run_engine(engine, [(job["prefix"] + job["suffix_b"], 1)], False)
            runs.append((b.metrics["first_token_time"] - b.metrics["arrival_time"], b.num_cached_tokens))
        result["on" if caching else "off"] = {"ttft_s": statistics.median(t for t, _ in runs), "runs": runs}
    result["speedup"] = result["off"]["ttft_s"] / result["on"]["ttft_s"]
    return result


def run_tokenmill(dtype_name: str, job: dict[str, Any]) -> dict[str, Any]:
    from tokenmill import LLM
    llm = LLM(model=job["gguf"], dtype=dtype_name, max_num_batched_tokens=job["max_num_batched_tokens"])
    llm.generate([{"prompt_token_ids": job["prefix"][:32]}], greedy(4))  # warm-up
    peak: dict[str, Any] = {"concurrency": max(map(int, job["batches"]))}

    def generate(c: int, requests: Requests) -> int:
        if c == peak["concurrency"]:
            outs, stats = run_engine(llm.engine, requests, True)
            peak.update(stats)
        else:
            outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], [greedy(n) for _, n in requests])
        for out, (_, n) in zip(outs, requests):
            if len(out.outputs[0].token_ids) != n:
                raise RuntimeError(f"asked for {n} tokens, got {len(out.outputs[0].token_ids)}")
        return sum(n for _, n in requests)

    return {"throughput": measure(job, generate), "kv_peak": peak,
            "capacity": capacity(job["gguf"], dtype_name, job["sizes"]), "ttft": ttft(llm, job)}


def run_transformers(dtype_name: str, job: dict[str, Any]) -> dict[str, Any]:
    import transformers
    gguf = Path(job["gguf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype_name)

    def generate(c: int, requests: Requests) -> int:
        width, new = max(len(ids) for ids, _ in requests), max(n for _, n in requests)
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in requests])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in requests])
        out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             eos_token_id=None, pad_token_id=0)
        if out.shape[1] - width != new:
            raise RuntimeError(f"asked for {new} new tokens, got {out.shape[1] - width}")
        return len(requests) * new

    generate(1, [(job["prefix"][:32], 4)])  # warm-up
    return {"throughput": measure(job, generate)}


def measure(job: dict[str, Any], generate: Callable[[int, Requests], int]) -> list[dict[str, Any]]:
    """Time generate(concurrency, requests) -> computed output tokens on every batch; one row per batch."""
    rows = []
    for c, requests in job["batches"].items():
        started = time.perf_counter()
        computed = generate(int(c), requests)
        wall = time.perf_counter() - started
        prompt, output = sum(len(ids) for ids, _ in requests), sum(n for _, n in requests)
        rows.append({"concurrency": int(c), "prompt_tokens": prompt, "output_tokens": output, "wall_s": wall,
                     "computed_output_tokens": computed, "output_tok_s": output / wall,
                     "total_tok_s": (prompt + output) / wall})
    return rows


def child(config: str, job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--one", config], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table; columns whose first cell starts with a digit are right-aligned."""
    align = "".join("---:|" if rows and str(cell)[:1].isdigit() else "---|" for cell in (rows or [header])[0])
    return ["| " + " | ".join(header) + " |", "|" + align] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def report(results: list[dict[str, Any]], job: dict[str, Any], args: argparse.Namespace) -> str:
    from tokenmill.hardware import describe
    facts, s = describe(), job["sizes"]
    lines = [
        "# tokenmill offline throughput (engine core)", "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- torch {torch.__version__}; CPU {facts['cpu']} ({facts['torch_capability']}), {THREADS} threads",
        f"- CPU flags: {facts['flags']}",
        f"- workload: windows of {TEXT.name} ({job['corpus_tokens']} tokens, tokenmill's tokenizer, same ids for both "
        f"engines), prompt {s['prompt'][0]}..{s['prompt'][1]} and output {s['output'][0]}..{s['output'][1]} tokens "
        f"uniform, seed {args.seed}; all requests submitted at once; greedy, EOS ignored; one process per config",
        "- tokenmill: LLM.generate (largest batch: its loop written out, to read stats), prefix caching on, block 16, "
        f"max_num_batched_tokens {job['max_num_batched_tokens']}",
        "- transformers: one batched generate per batch, left padding + attention_mask, do_sample=False, "
        "eos_token_id=None, max_new_tokens = the batch's largest output length; every row is computed to that "
        "length, but only each request's own output length counts as useful tokens (`computed out` column)",
        "", "## Throughput", ""]
    tps = {(r["engine"], r["dtype"], t["concurrency"]): t["output_tok_s"] for r in results for t in r["throughput"]}
    lines += table(["engine", "dtype", "concurrency", "prompt tok", "output tok", "computed out", "wall s",
                    "output tok/s", "total tok/s"],
                   [[r["engine"], r["dtype"], t["concurrency"], t["prompt_tokens"], t["output_tokens"],
                     t["computed_output_tokens"], f"{t['wall_s']:.2f}", f"{t['output_tok_s']:.1f}",
                     f"{t['total_tok_s']:.1f}"] for r in results for t in r["throughput"]])
    pairs = [(d, c) for d in args.dtypes for c in args.concurrency
             if {("tokenmill", d, c), ("transformers", d, c)} <= tps.keys()]
    if pairs:
        lines += ["", "tokenmill / transformers, useful output tok/s:", ""] + table(["dtype", "concurrency", "ratio"], [
            [d, c, f"{tps['tokenmill', d, c] / tps['transformers', d, c]:.2f}x"] for d, c in pairs])
    tm = [r for r in results if r["engine"] == "tokenmill"]
    if tm:
        lines += ["", f"## KV cache at peak load (tokenmill, concurrency {tm[0]['kv_peak']['concurrency']}, "
                  "engine.stats() after every step)", ""]
        lines += table(["dtype", "peak blocks used / total", "kv_utilization at peak (tokens / slots in its blocks)",
                        "running / waiting at peak", "preemptions", "prefix hits / queries"],
                       [[r["dtype"], f"{k['kv_blocks_used']} / {k['kv_blocks_total']} "
                         f"({k['kv_blocks_used'] / k['kv_blocks_total']:.1%})", f"{k['kv_utilization']:.1%}",
                         f"{k['num_running']} / {k['num_waiting']}", f["num_preemptions"],
                         f"{f['prefix_cache_hits']} / {f['prefix_cache_queries']}"]
                        for r in tm for k, f in [(r["kv_peak"]["at_peak"], r["kv_peak"]["final"])]])
        lines += ["", f"## Capacity: concurrent {s['cap_prompt']}+{s['cap_output']}-token requests in 4 GiB of KV", ""]
        lines += table(["dtype", "bytes/block", "blocks", "blocks/request", "max requests",
                        "verified on LLM(kv_cache_memory=4 GiB)"],
                       [[r["dtype"], c["bytes_per_block"], c["num_blocks"], c["blocks_per_request"], c["max_requests"],
                         f"{'yes' if c['verified'] else 'NO'} (admitted {c['admitted']}, grown to full: "
                         f"{c['grown_to_full']}, free blocks left {c['free_after']})"]
                        for r in tm for c in [r["capacity"]]])
        lines += [""] + [f"- {r['dtype']}: {r['capacity']['formula']}" for r in tm]
        lines += ["", f"## TTFT of a request sharing a {s['prefix']}-token prefix with an earlier one", "",
                  "A = prefix + 20 tokens runs first, then B = prefix + 30 other tokens; TTFT(B) = first_token_time - "
                  "arrival_time, median of 3 fresh engines.", ""]
        lines += table(["dtype", "caching on ms", "cached tokens", "caching off ms", "off / on"],
                       [[r["dtype"], f"{1000 * t['on']['ttft_s']:.1f}", t["on"]["runs"][0][1],
                         f"{1000 * t['off']['ttft_s']:.1f}", f"{t['speedup']:.1f}x"] for r in tm for t in [r["ttft"]]])
    lines += ["", "Raw results (one JSON line per config):", "", "```", *map(json.dumps, results), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=("tokenmill", "transformers", *CONFIGS),
                        default=["tokenmill", "transformers"], help="engines (crossed with --dtypes) or engine-dtype")
    parser.add_argument("--concurrency", nargs="+", type=int, help="batch sizes (default 1 8 32 64; --quick: 1 4)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokenmill's per-step token budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, help="also write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.one:
        job = json.loads(sys.stdin.read())
        engine, dtype_name = args.one.split("-")
        result = (run_tokenmill if engine == "tokenmill" else run_transformers)(dtype_name, job)
        print(json.dumps({"config": args.one, "engine": engine, "dtype": dtype_name, **result}), flush=True)
        return
    args.concurrency = list(dict.fromkeys(args.concurrency or ([1, 4] if args.quick else [1, 8, 32, 64])))
    if min(args.concurrency) < 1 or sum(args.concurrency) > 1000:
        parser.error("--concurrency values must be >= 1, with at most 1000 requests in all (distinct corpus offsets)")
    configs = list(dict.fromkeys(c if "-" in c else f"{c}-{d}" for c in args.configs for d in args.dtypes))
    job = build_job(args)
    results = [child(config, job) for config in tqdm(configs, desc="configs", unit="config")]
    text = report(results, job, args)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text)


if __name__ == "__main__":
    main()
