"""The `tokenmill` command: serve, generate, chat, info, models (and bench, eval, quantize)."""
from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import math
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterator

from tokenmill.config import DEFAULT_KV_CACHE_MEMORY, KV_CACHE_DTYPES, QUANTIZATION_METHODS
from tokenmill.errors import TokenmillError


_UNIT_BYTES = {"": 1, "b": 1, **{f"{u}{b}": 1000 ** (i + 1) for i, u in enumerate("kmgt") for b in ("", "b")},
               **{f"{u}ib": 1024 ** (i + 1) for i, u in enumerate("kmgt")}}


def parse_memory(text: str) -> int | float:
    """--kv-cache-memory: whole bytes with an optional unit (B; K/KB = 10^3 ... T/TB = 10^12; KiB = 2^10 ...
    TiB = 2^40; any case), or a fraction of available memory in (0, 1]. A bare number above 1 must be whole:
    "1.5" is neither (type=float used to read it as 1 byte)."""
    match = re.fullmatch(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in _UNIT_BYTES or not math.isfinite(float(match.group(1))):
        raise argparse.ArgumentTypeError(f"expected bytes (e.g. 4GiB, 512MB, 1073741824) or a fraction of memory "
                                         f"in (0, 1] (e.g. 0.5), got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    if not unit and 0 < value <= 1:
        return value
    size = value * _UNIT_BYTES[unit]
    if _UNIT_BYTES[unit] == 1 and not size.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction of memory in (0, 1] nor a whole number "
                                         "of bytes; give a unit for a size (e.g. 1.5GiB)")
    if not 1 <= size < math.inf:
        raise argparse.ArgumentTypeError(f"a KV cache size is at least 1 byte and finite, got {text!r}")
    return int(size)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine knobs, named as vLLM's CLI names them."""
    p.add_argument("--model", default=None,
                   help="a .gguf file, HF model directory or model name from `tokenmill models` "
                        "(default: embedded SmolLM2-135M-Instruct)")
    _add_models_dir_arg(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="weight format: native (a GGUF's own blocks; the default with --dtype auto), int8, int4")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (inputs per scale)")
    p.add_argument("--kv-cache-memory", type=parse_memory, default=DEFAULT_KV_CACHE_MEMORY, metavar="SIZE",
                   help="KV cache size: bytes with an optional unit (4GiB = 4*2^30, 4GB = 4G = 4*10^9; also K, M, T, "
                        "KiB, MiB, TiB) or a fraction in (0, 1] of available memory (default 4GiB); per model: "
                        "`serve` with several models gives each engine a budget of this size (as vLLM: one per "
                        "engine)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache element type; auto: float16 when packed weights run natively, else the compute "
                        "dtype (as vLLM's --kv-cache-dtype auto, with llama.cpp's f16 cache as the native default)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM: \'{"method": "ngram", "num_speculative_tokens": 4}\' or '
                        '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\' (default: off)')
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads (default: $OMP_NUM_THREADS if set, else the CPUs this process may use: "
                        "affinity and cgroup quota); use 1 when other processes keep the cores busy, as every "
                        "decode step waits for its slowest thread")


def _add_models_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default=None,
                   help="folder of local GGUF files / HF model folders that model names resolve to "
                        "(default: $TOKENMILL_MODELS_DIR, else ~/.cache/tokenmill/models)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, quantization=args.quantization, group_size=args.group_size,
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative_config=args.speculative_config, threads=args.threads,
    )


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
    from tokenmill import LLM

    params = _sampling_params(args)  # before loading: a bad option fails at once, not after the model loads
    llm = LLM(args.model, progress=True, **_engine_kwargs(args))
    prompt: str | list[int] = args.prompt
    if args.chat_template:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    for piece in _stream(llm, prompt, params):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from tokenmill import LLM

    params = _sampling_params(args)
    llm = LLM(args.model, progress=True, **_engine_kwargs(args))
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
    from tokenmill import LLM  # after the checks: a bad option fails at once, not after torch imports
    from tokenmill.server.launch import ModelToServe, serve
    from tokenmill.server.params import RequestLimits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_serve = [ModelToServe(LLM(model, progress=True, **_engine_kwargs(args)), model, name)
                for model, name in zip(models, names)]
    serve(to_serve, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_waiting,
          shutdown_timeout=args.shutdown_timeout, log_prompts=args.log_prompts,
          limits=RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts), max_body_bytes=args.max_body_bytes,
          allowed_hosts=args.allowed_hosts)


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
            hint = "; another process is listening there: stop it or choose --port" if exc.errno == errno.EADDRINUSE else ""
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
    from tokenmill.model.loader.gguf import PackedTensor
    from tokenmill.quant.gguf_blocks import NATIVE_TYPES

    quantized = [w for w in ckpt.weights.values() if isinstance(w, PackedTensor) and w.is_quantized]
    if not quantized:
        return {}
    kinds = {"packed (native kernels)": [w for w in quantized if w.qtype in NATIVE_TYPES],
             "dequantized to float": [w for w in quantized if w.qtype not in NATIVE_TYPES]}
    return {key: ", ".join(sorted({w.qtype.name for w in ws})) or "none" for key, ws in kinds.items()}


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
    _add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate a completion and stream it to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat turn")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat using the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="print a model's metadata and size")
    info.add_argument("model", nargs="?", default=None, help="a .gguf file, HF model directory or model name")
    _add_models_dir_arg(info)
    info.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="list the models installed here and the names that load them")
    _add_models_dir_arg(models)
    models.set_defaults(func=cmd_models)

    from tokenmill.bench.cli import add_bench_parser
    from tokenmill.quant.cli import add_quant_parsers

    add_bench_parser(sub)
    add_quant_parsers(sub)
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
