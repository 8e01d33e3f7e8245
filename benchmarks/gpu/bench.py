"""The GPU path on a lent GPU (issue 25): correctness against the CPU path, then batch-1 decode bandwidth and
throughput at 1/16/64/256 concurrent requests. Run by benchmarks/gpu/run_on_device.sh; writes JSON.

  TOKENMILL_NATIVE_KERNELS=0 python benchmarks/gpu/bench.py correctness --model M.gguf --out c.json
  python benchmarks/gpu/bench.py speed --model M.gguf --out s.json
  BENCH_OUTPUT_TOKENS=16 TRITON_INTERPRET=1 python benchmarks/gpu/bench.py speed --model TINY --concurrency 1 4 \
      --kv-cache-memory 4194304 --out s.json     # a dry run of the script on a CPU (no timing meaning)

correctness: greedy tokens of the GPU path (float32, then its bfloat16 default) against the CPU path in float32
without its native kernels (plain PyTorch: the same float math; the native kernels quantize activations to int8),
on a batch of prompts; where tokens part, the CPU run's margin between its top two logprobs at that step says
whether it is a near-tie.
speed: the GPU path's default (bfloat16 activations, bfloat16 KV, decode steps as CUDA graphs). Batch-1 decode: 256
tokens after a 128-token prompt, less the time of the prompt and first token; bandwidth = bytes of weights one
token streams (embedding row excluded) x tokens/s, against the GPU's nominal HBM bandwidth and a measured
device-to-device copy; once more with enforce_eager (no graphs). Throughput: N distinct 128-token prompts, 256
output tokens each (ignore_eos), offline continuous batching.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.model.build import weight_bytes_per_token
from tokenmill.model.layers import quantized

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # nominal (NVIDIA data sheets; H100 SXM)
PROMPT_TOKENS = 128
OUTPUT_TOKENS = int(os.environ.get("BENCH_OUTPUT_TOKENS", 256))  # fewer for a dry run under the interpreter


def _prompts(n: int, length: int = PROMPT_TOKENS, seed: int = 0) -> list[dict]:
    """n distinct prompts of random token ids (below 30000: every model here has more)."""
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(100, 30000, (length,), generator=g).tolist()} for _ in range(n)]


def _environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count}
    return env


def _synchronize() -> None:
    if torch.cuda.is_available():  # (a dry run under Triton's interpreter has none)
        torch.cuda.synchronize()


def _copy_bandwidth() -> float | None:
    """Bytes read + written per second by a 2 GiB device-to-device copy (best of 5)."""
    if not torch.cuda.is_available():
        return None
    a = torch.empty(2**30, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * a.element_size() / best


def correctness(model: str, steps: int) -> dict:
    # the CPU side's dequantize-and-multiply in float32, not the bfloat16 it takes on CPUs with native bfloat16
    quantized.GEMM_DTYPE = torch.float32
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=2)
    cpu = LLM(model, dtype="float32", device="cpu", weight_cache=False)
    prompts = _prompts(4, 32)
    want = [o.outputs[0] for o in cpu.generate(prompts, params)]
    del cpu
    result = {"steps": steps, "prompts": len(prompts)}
    for dtype in ("float32", "auto"):
        gpu = LLM(model, dtype=dtype, device="cuda", weight_cache=False)
        got = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
        rows = []
        for w, g in zip(want, got):
            first = next((i for i, (a, b) in enumerate(zip(w.token_ids, g)) if a != b), None)
            margin = None
            if first is not None:
                top = sorted(w.logprobs[first].values(), key=lambda lp: -lp.logprob)
                margin = top[0].logprob - top[1].logprob if len(top) > 1 else None
            rows.append({"first_divergence": first, "cpu_top2_margin_there": margin})
        result[f"gpu_{str(gpu.dtype).removeprefix('torch.')}"] = {"equal": all(r["first_divergence"] is None
                                                                                for r in rows), "prompts": rows}
        del gpu
        torch.cuda.empty_cache()
    return result


def _timed(llm: LLM, prompts: list, tokens: int) -> float:
    _synchronize()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    _synchronize()
    return time.perf_counter() - start


def _batch1_tokens_per_s(llm: LLM) -> float:
    """Decode tok/s of one request: OUTPUT_TOKENS after the first, best of 3 (after a warm-up that compiles)."""
    prompt = _prompts(1, seed=1)
    _timed(llm, prompt, 16)
    first = min(_timed(llm, prompt, 1) for _ in range(3))
    whole = min(_timed(llm, prompt, OUTPUT_TOKENS + 1) for _ in range(3))
    return OUTPUT_TOKENS / (whole - first)


def speed(model: str, concurrency: list[int], kv_memory: str) -> dict:
    kv = float(kv_memory) if "." in kv_memory else int(kv_memory)
    llm = LLM(model, device="cuda", max_num_seqs=max(concurrency), max_num_batched_tokens=8192, kv_cache_memory=kv,
              weight_cache=False)
    per_token = weight_bytes_per_token(llm.model)
    out: dict = {"describe": llm.describe(), "weight_bytes_per_token": per_token}
    name = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else ""
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    copy = _copy_bandwidth()
    out["hbm_nominal_bytes_per_s"], out["copy_bytes_per_s"] = peak, copy
    tps = _batch1_tokens_per_s(llm)
    out["batch1_decode"] = {"tokens_per_s": tps, "bytes_per_s": tps * per_token,
                            "pct_of_hbm": None if peak is None else 100 * tps * per_token / peak,
                            "pct_of_copy": None if copy is None else 100 * tps * per_token / copy}
    print(json.dumps(out["batch1_decode"]), flush=True)
    out["throughput"] = []
    for n in concurrency:
        seconds = _timed(llm, _prompts(n, seed=100 + n), OUTPUT_TOKENS)
        out["throughput"].append({"concurrency": n, "seconds": seconds,
                                  "output_tokens_per_s": n * OUTPUT_TOKENS / seconds})
        print(json.dumps(out["throughput"][-1]), flush=True)
    del llm
    torch.cuda.empty_cache()
    eager = LLM(model, device="cuda", enforce_eager=True, kv_cache_memory=kv, weight_cache=False)
    out["batch1_decode_eager_tokens_per_s"] = _batch1_tokens_per_s(eager)  # what the CUDA graphs save
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["correctness", "speed"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=16, help="correctness: greedy tokens per prompt")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--kv-cache-memory", default="0.5", help="bytes, or a fraction of free GPU memory")
    args = parser.parse_args()
    result = {"environment": _environment(), "model": args.model}
    if args.what == "correctness":
        result |= correctness(args.model, args.steps)
    else:
        result |= speed(args.model, args.concurrency, args.kv_cache_memory)
    text = json.dumps(result, indent=1)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
