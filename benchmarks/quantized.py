"""Issue 6 scoreboard: weight formats on the default model against llama.cpp, in one run on this machine.

Run:  python benchmarks/quantized.py --out benchmarks/results/quantized   (quiet machine; ~10 min on 2 cores)

Single stream: `tokenmill bench latency` (128-token prompt, 64 new tokens, greedy, EOS ignored, median of 3
after a warm-up) for each weight format, each in a fresh process (its peak RSS is its own), against
`llama-bench -p 128 -n 64` on the same GGUF. Throughput at B concurrent: B requests of 128 prompt tokens and
128 output tokens submitted at once (`tokenmill bench offline --dataset random`), against
`llama-batched-bench -npp 128 -ntg 128 -npl B`; output tok/s = B * 128 / wall time for both.
bfloat16 runs only where the CPU has native bf16: emulated bf16 GEMMs run at ~1.4 GFLOP/s (shared notes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tokenmill.hardware import describe, has_native_bf16
from tokenmill.model.loader.default_model import default_model_path

FORMATS = {  # name -> tokenmill CLI flags
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8 (RTN)": ["--quantization", "int8"],
    "int4 g32 (RTN)": ["--quantization", "int4"],
    "native GGUF Q4_1": [],
}
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "llama.cpp" / "bin"
IK_PEERS = PEERS.parents[1] / "ik_llama.cpp" / "bin"


def run(cmd: list[str], out: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with out.open("w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})


def tokenmill_latency(flags: list[str], out: Path, prompt_len: int = 128) -> dict:
    result = out.with_suffix(".json")
    run(["tokenmill", "bench", "latency", "--input-len", str(prompt_len), "--output-len", "64", "--num-iters", "3",
         "--num-iters-warmup", "1", *flags, "--save-result", str(result)], out.with_suffix(".log"))
    return json.loads(result.read_text())["metrics"]


def tokenmill_throughput(batch: int, out: Path) -> float:
    result = out.with_suffix(".json")
    run(["tokenmill", "bench", "offline", "--dataset", "random", "--input-len", "128", "--output-len", "128",
         "--num-prompts", str(batch), "--max-num-seqs", str(batch), "--ignore-eos", "--save-result", str(result)],
        out.with_suffix(".log"))
    return json.loads(result.read_text())["metrics"]["output_throughput"]


def llama_bench(model: Path, out: Path, bin_dir: Path = PEERS, *extra: str, prompt_len: int = 128) -> dict[str, float]:
    """llama-bench of `bin_dir` (llama.cpp's, or ik_llama.cpp's with extra=("-rtr", "1")): prefill `prompt_len`,
    decode 64."""
    run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", "2", "-p", str(prompt_len), "-n", "64", "-r", "3",
         *extra, "-o", "json"], out)
    rows = json.loads(out.read_text()[out.read_text().index("["):])
    return {("decode" if r["n_gen"] else "prefill"): r["avg_ts"] for r in rows}


def llama_bench_decode_at(model: Path, depth: int, out: Path, bin_dir: Path = PEERS, *extra: str) -> float:
    """llama-bench's decode tok/s of 64 tokens after `depth` tokens of context (tg64 @ d`depth`), as tokenmill's
    `bench latency` measures it: mainline's `-d`, ik_llama.cpp's `-gp depth,64` (its build has no `-d`)."""
    where = ["-d", str(depth)] if bin_dir == PEERS else ["-gp", f"{depth},64"]
    run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", "2", "-p", "0", "-n", "0" if bin_dir != PEERS else "64",
         *where, "-r", "3", *extra, "-o", "json"], out)
    rows = json.loads(out.read_text()[out.read_text().index("["):])
    return next(r["avg_ts"] for r in rows if r["n_gen"])


def llama_batched(model: Path, batch: int, out: Path) -> float:
    run([str(PEERS / "llama-batched-bench"), "-m", str(model), "-t", "2", "-c", str(batch * 256 + 256), "-npp", "128",
         "-ntg", "128", "-npl", str(batch), "--output-format", "jsonl"], out)
    row = json.loads([line for line in out.read_text().splitlines() if line.startswith("{")][-1])
    return batch * 128 / row["t"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized"))
    parser.add_argument("--batches", default="16,32")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = default_model_path()
    lines = [f"CPU: {json.dumps(describe())}", "",
             "| format | peak RSS MiB | weights MB/token | prefill tok/s | decode tok/s | ms/token | bandwidth used |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, flags in FORMATS.items():
        if name == "bfloat16" and not has_native_bf16():
            lines.append("| bfloat16 | skipped: no native bf16 on this CPU | | | | | |")
            continue
        r = tokenmill_latency(flags, args.out / name.split()[0].replace("/", ""))
        lines.append(f"| tokenmill {name} | {r['peak_rss_mib']:.0f} | {r['weight_bytes_per_token'] / 1e6:.1f} | "
                     f"{r['median_prefill_tok_s']:.0f} | {r['median_decode_tok_s']:.1f} | "
                     f"{1000 / r['median_decode_tok_s']:.1f} | {100 * r['bandwidth_fraction']:.0f}% of "
                     f"{r['memory_read_gb_s']:.0f} GB/s |")
    if (PEERS / "llama-bench").exists():
        peer = llama_bench(model, args.out / "llama-bench.json")
        lines.append(f"| llama.cpp Q4_1 (llama-bench) | | | {peer['prefill']:.0f} | {peer['decode']:.1f} | "
                     f"{1000 / peer['decode']:.1f} | |")
    lines += ["", "| concurrent requests | tokenmill native out tok/s | llama.cpp out tok/s | ratio |",
              "|---:|---:|---:|---:|"]
    for batch in map(int, args.batches.split(",")):
        ours = tokenmill_throughput(batch, args.out / f"offline_b{batch}")
        peer = (llama_batched(model, batch, args.out / f"llama-batched_b{batch}.jsonl") if PEERS.exists()
                else float("nan"))
        lines.append(f"| {batch} | {ours:.0f} | {peer:.0f} | {ours / peer:.2f}x |")
    report = "\n".join(lines)
    (args.out / "quantized.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    sys.exit(main())
