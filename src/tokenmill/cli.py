"""The `tokenmill` command: serve, generate, chat, info, models (and bench, eval, quantize)."""
from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from tokenmill.engine_args import EngineArgs, add_models_dir_arg
from tokenmill.errors import TokenmillError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _stream(llm, prompt: str | list[int], params) -> Iterator[str]:
    """Yield text pieces as the engine produces them."""
    engine = llm.engine
    engine.add_request(uuid.uuid4().hex, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            yield out.outputs[0].delta_text


def cmd_generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)  # before loading: a bad option fails at once, not after the model loads
    llm = EngineArgs.from_cli_args(args).create_llm(progress=True)
    prompt: str | list[int] = args.prompt
    if args.chat_template:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    for piece in _stream(llm, prompt, params):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    llm = EngineArgs.from_cli_args(args).create_llm(progress=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with", llm.config.name or llm.checkpoint.path.name, "- empty line or Ctrl-D to quit.")
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        pieces = []
        for piece in _stream(llm, ids, params):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        reply = "".join(pieces)
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> None:
    models = _served_models(args)
    names = args.served_model_name or [None] * len(models)
    if len(names) != len(models):
        raise ValueError(f"--served-model-name given {len(names)} times for {len(models)} models; give it once per "
                         "model, in the models' order, or not at all")
    if args.max_waiting is not None and args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    _check_can_listen(args.host, args.port)
    from tokenmill.server.launch import ModelToServe, serve  # after the checks: a bad option fails at once
    from tokenmill.server.params import RequestLimits
    from tokenmill.server.result_cache import ResultCache, open_store

    result_cache = (ResultCache(open_store(args.result_cache, args.result_cache_ttl, args.result_cache_max_entries),
                                args.result_cache) if args.result_cache else None)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def load(model: str | None, name: str | None) -> ModelToServe:  # the LLM goes; its engine is served
        engine_args = EngineArgs.from_cli_args(args, model=model, seed=args.seed)
        llm = engine_args.create_llm(progress=True)
        if args.chat_template is not None:
            llm.tokenizer.chat_template = _template_text(args.chat_template)
        identity = {**engine_args.output_identity(), "chat_template": args.chat_template}
        return ModelToServe(llm.engine, llm.checkpoint.path, model, name, identity)

    to_serve = [load(model, name) for model, name in zip(models, names)]
    serve(to_serve, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_waiting,
          shutdown_timeout=args.shutdown_timeout, log_prompts=args.log_prompts,
          limits=RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts,
                               auto_tool_choice=args.enable_auto_tool_choice), max_body_bytes=args.max_body_bytes,
          allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins, result_cache=result_cache,
          metrics_prefix=args.metrics_prefix)


def _template_text(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it names no file (as vLLM takes it)."""
    path = Path(value)
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else value
    except OSError as exc:
        raise ValueError(f"--chat-template {value}: {exc}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _check_can_listen(host: str, port: int) -> None:
    """Bind host:port once (as uvicorn will: SO_REUSEADDR) before the models load, so a port in use is an error
    at once rather than after seconds or minutes of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on --host {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            hint = "; another process is listening there: stop it or choose --port" if in_use else ""
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None


def _served_models(args: argparse.Namespace) -> list[str | None]:
    """The positional models, or --model, or the default model (None); each is served by its own engine."""
    if args.model_tag and args.model and args.model_tag != [args.model]:
        raise ValueError(f"model given twice: {' '.join(args.model_tag)!r} and --model {args.model!r}")
    return args.model_tag or [args.model]


def cmd_info(args: argparse.Namespace) -> None:
    from tokenmill.model.loader import load_checkpoint

    ckpt = load_checkpoint(args.model)
    cfg = ckpt.config
    rows = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "name": cfg.name,
        "architecture": cfg.architecture,
        "size on disk": f"{ckpt.size_bytes / 2**20:.1f} MiB",
        "parameters": f"{cfg.num_params_estimate / 1e6:.1f} M",
        "layers": cfg.num_layers,
        "hidden / intermediate": f"{cfg.hidden_size} / {cfg.intermediate_size}",
        "heads / kv heads / head dim": f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}",
        "vocab": cfg.vocab_size,
        "context length": cfg.max_position_embeddings,
        "rope theta / scaling": f"{cfg.rope_theta:g} / {cfg.rope_scaling or 'none'}",
        "rms norm eps": f"{cfg.rms_norm_eps:g}",
        "tied embeddings": cfg.tie_word_embeddings,
        "tensor types": ", ".join(f"{k} x{v}" for k, v in ckpt.weight_types().most_common()),
        **_native_rows(ckpt),
        "chat template": "yes" if ckpt.tokenizer.chat_template else "no",
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def _native_rows(ckpt) -> dict[str, str]:
    """Which quantized tensor types the default (native) path keeps packed, and which it dequantizes."""
    from tokenmill.quant.gguf_blocks import NATIVE_TYPES
    from tokenmill.quant.packed import PackedTensor

    quantized = [w for w in ckpt.weights.values() if isinstance(w, PackedTensor) and w.is_quantized]
    if not quantized:
        return {}
    kinds = {"packed (native kernels)": [w for w in quantized if w.qtype in NATIVE_TYPES],
             "dequantized to float": [w for w in quantized if w.qtype not in NATIVE_TYPES]}
    rows = {key: ", ".join(sorted({w.qtype.name for w in ws})) or "none" for key, ws in kinds.items()}
    rows["bits per weight (file -> memory)"] = ", ".join(_bits_per_weight(kinds["packed (native kernels)"]))
    return rows


def _bits_per_weight(packed: list) -> list[str]:
    """Each packed type's bits per weight in the file and as the kernels hold it (its smallest tensor repacked)."""
    from tokenmill.kernels.quant_ops import kernel_layout
    from tokenmill.quant.gguf_blocks import repack

    smallest: dict = {}
    for w in packed:
        if len(w.shape) == 2 and w.nbytes < getattr(smallest.get(w.qtype), "nbytes", float("inf")):
            smallest[w.qtype] = w
    out = []
    for qtype, w in sorted(smallest.items(), key=lambda kv: kv[0].name):
        numel = w.shape[0] * w.shape[1]
        out.append(f"{qtype.name} {8 * w.nbytes / numel:.2f} -> {8 * kernel_layout(repack(w)).nbytes / numel:.2f}")
    return out


def cmd_models(args: argparse.Namespace) -> None:
    from tokenmill.model.loader.catalog import get_cache_dir, get_models_dir, list_models

    rows = [("NAME", "ARCH", "QUANT", "TENSOR TYPES", "SIZE", "CONTEXT", "SOURCE")]
    for m in list_models():
        size = "-" if m.size_bytes is None else f"{m.size_bytes / 2**20:.1f} MiB"
        rows.append((m.name, m.architecture or "-", m.file_type or "-", ",".join(m.tensor_types) or "-", size,
                     str(m.context_length or "-"), m.source + (f" ({m.note})" if m.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]))
    print(f"\nmodels dir: {get_models_dir()}\ncache dir:  {get_cache_dir()} ($TOKENMILL_CACHE_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Fast LLM inference on PyTorch")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    srv.add_argument("model_tag", nargs="*", default=[], metavar="MODEL",
                     help="a .gguf file, HF model directory or model name (same as --model); several serve them "
                          "all, each by its own engine, routed by the request's `model` field (requests without "
                          "one go to the first); each model gets the whole --kv-cache-memory and --max-waiting")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                          "(default: $TOKENMILL_API_KEY; /health and /metrics stay open)")
    srv.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                     help="the model id clients send and /v1/models lists (default: the file's short name); "
                          "with several models, give it once per model, in order")
    srv.add_argument("--max-waiting", type=int, default=None,
                     help="answer 429 when this many requests already wait to be scheduled, per model "
                          "(default: no limit)")
    srv.add_argument("--shutdown-timeout", type=float, default=10.0,
                     help="seconds in-flight requests get to finish on SIGTERM/SIGINT before they are aborted")
    srv.add_argument("--log-prompts", action="store_true", help="include prompt text in the per-request log lines")
    srv.add_argument("--max-n", type=_positive_int, default=128,
                     help="largest `n` (completions per prompt) one request may ask for (default: 128, OpenAI's cap)")
    srv.add_argument("--max-prompts", type=_positive_int, default=256,
                     help="most prompts one /v1/completions request may carry (default: 256)")
    srv.add_argument("--max-body-bytes", type=_positive_int, default=16 * 2**20,
                     help="largest request body accepted; larger ones get 413 before they are parsed "
                          "(default: 16 MiB)")
    srv.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                     help="answer only requests whose Host header names one of these (e.g. localhost 127.0.0.1): "
                          "guards a server without --api-key against DNS rebinding from web pages (default: any)")
    srv.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                     help="answer browsers' cross-origin (CORS) requests from these origins, e.g. "
                          "http://localhost:3000, or * for any (default: none: browsers refuse cross-origin calls)")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='let requests with tools leave tool_choice "auto" (OpenAI\'s default): the model decides, '
                          "and its calls are read in --tool-call-parser's format")
    srv.add_argument("--tool-call-parser", choices=["hermes"], default="hermes",
                     help="the call format of --enable-auto-tool-choice: hermes (<tool_call> JSON </tool_call>, "
                          "Qwen2.5's and most open models'; also a bare JSON call); the only one so far")
    srv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                     help="a Jinja2 chat template (a file, or the template itself) in place of the model's own, "
                          "for every served model")
    srv.add_argument("--seed", type=int, default=None,
                     help="seed for the draws of requests that bring none (default: a fresh one each start)")
    srv.add_argument("--result-cache", default=None, metavar="memory|redis://HOST:PORT[/DB]",
                     help="answer deterministic requests (temperature 0, or with a seed) seen before from a cache of "
                          "their results: in this process (memory) or in Redis, shared by servers; a request's "
                          "'Cache-Control: no-cache' skips the lookup, 'no-store' the cache (default: off)")
    srv.add_argument("--result-cache-ttl", type=float, default=3600.0, metavar="SECONDS",
                     help="seconds a cached result is served (default: 3600)")
    srv.add_argument("--result-cache-max-entries", type=int, default=10000,
                     help="results the cache holds; the oldest go first (default: 10000)")
    srv.add_argument("--metrics-prefix", choices=["tokenmill", "vllm"], default="tokenmill",
                     help="the prefix of every /metrics name: vllm exposes vLLM's own names "
                          "(vllm:num_requests_waiting, vllm:kv_cache_usage_perc, ...) for the Gateway API Inference "
                          "Extension, llm-d and KServe")
    EngineArgs.add_cli_args(srv)
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate a completion and stream it to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat turn")
    EngineArgs.add_cli_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat using the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="print a model's metadata and size")
    info.add_argument("model", nargs="?", default=None, help="a .gguf file, HF model directory or model name")
    add_models_dir_arg(info)
    info.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="list the models installed here and the names that load them")
    add_models_dir_arg(models)
    models.set_defaults(func=cmd_models)

    from tokenmill.bench.cli import add_bench_parser
    from tokenmill.compress.cli import add_compress_parsers

    add_bench_parser(sub)
    add_compress_parsers(sub)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("tokenmill")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed as a package: `pip install -e .` records its version)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "models_dir", None):  # the environment reaches every place that resolves a name
        os.environ["TOKENMILL_MODELS_DIR"] = args.models_dir
    try:
        args.func(args)
    except (TokenmillError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
