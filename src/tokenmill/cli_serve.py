"""`tokenmill serve`: its options, the checks that fail before anything loads, and the server it starts (one
process, or Ray Serve replicas behind one endpoint with --replicas)."""
from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import socket
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.engine_args import EngineArgs

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tokenmill.engine.core_proc import EngineCoreHandle
    from tokenmill.engine.engine import LLMEngine

REPLICA_FLAGS = ("--min-replicas", "--max-replicas", "--ray-address", "--routing")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
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
    srv.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="serve N engine replicas (processes, each with its own KV cache) behind this endpoint on "
                          "Ray Serve, routed by prompt-prefix affinity; needs tokenmill[distributed] "
                          "(default: one process, no Ray)")
    srv.add_argument("--min-replicas", type=int, default=None,
                     help="with --max-replicas: let Ray Serve scale the replicas between the two by ongoing requests")
    srv.add_argument("--max-replicas", type=int, default=None)
    srv.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. auto, or ray://HEAD:10001) instead of starting one here")
    srv.add_argument("--routing", choices=["prefix", "round-robin"], default=None,
                     help="how --replicas pick a replica: prefix (default: the replica that served the longest "
                          "prefix of the prompt, unless it is much busier) or round-robin")
    EngineArgs.add_cli_args(srv)
    srv.set_defaults(func=cmd_serve)


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
    if args.replicas is not None:
        _serve_replicas(args, len(models))
        return
    if given := [flag for flag in REPLICA_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]:
        raise ValueError(f"{', '.join(given)}: needs --replicas N (Ray Serve replicas)")
    app = server_app(args)  # first: it starts the engine cores before this process imports the server
    from tokenmill.server.launch import serve

    serve(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)


def _serve_replicas(args: argparse.Namespace, num_models: int) -> None:
    from tokenmill.engine.kv_events import KVEventsConfig
    from tokenmill.server.result_cache import open_store

    if args.result_cache:  # a bad URL or bound fails now, not after Ray and the replicas start
        open_store(args.result_cache, args.result_cache_ttl, args.result_cache_max_entries)
    if num_models > 1:
        raise ValueError("--replicas serves one model (each replica runs it); start one deployment per model")
    try:
        from tokenmill.distributed.replicas import ReplicaSet, serve_replicas
    except ImportError as exc:
        raise ValueError(f"--replicas runs on Ray Serve, which is not installed ({exc}): "
                         "pip install 'tokenmill[distributed]'") from None
    from tokenmill.model.placement import resolve_device

    gpus = int(resolve_device(args.device) == "cuda")  # Ray shows a replica only the GPUs it asks for
    replica_set = ReplicaSet(args.replicas, args.min_replicas, args.max_replicas, routing=args.routing or "prefix",
                             gpus=gpus)
    replica_set.deployment_options()  # a bad combination fails before Ray starts
    if (kv_events := KVEventsConfig.parse(args.kv_events_config)) is not None:
        kv_events.for_rank(max(args.replicas, args.max_replicas or 0) - 1)  # every replica needs a port of its own
    if args.threads is None:  # Ray sets OMP_NUM_THREADS=1 in its workers: give each replica its share of the cores
        from tokenmill.hardware import available_cpus

        args.threads = max(1, available_cpus() // args.replicas)
    serve_replicas(partial(server_app, args), replica_set, host=args.host, port=args.port,
                   ray_address=args.ray_address)


def server_app(args: argparse.Namespace, replica_rank: int = 0) -> FastAPI:
    """Start an engine core per model `tokenmill serve` was given and build the app over them (in the server
    process, or in each Ray Serve replica: `replica_rank` moves its KV event ports up by the rank)."""
    from tokenmill.engine.kv_events import KVEventsConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kv_events = KVEventsConfig.parse(args.kv_events_config)
    template = None if args.chat_template is None else _template_text(args.chat_template)
    models = _served_models(args)
    names = args.served_model_name or [None] * len(models)
    # each engine (a model here, a replica of the one model with --replicas) publishes KV events on its own ports
    engine_args = [EngineArgs.from_cli_args(args, model=model, seed=args.seed,
                                            kv_events_config=kv_events and asdict(kv_events.for_rank(replica_rank + i)))
                   for i, model in enumerate(models)]
    # The cores start first and build their engines while this process imports the server and loads tokenizers:
    # ready when the slower side is, not after both.
    cores = [_start_core(e) for e in engine_args]

    from tokenmill.model.loader import load_tokenizer, resolve_model_path
    from tokenmill.server.launch import ModelToServe, ServerOptions, build_server_app
    from tokenmill.server.params import RequestLimits
    from tokenmill.server.result_cache import ResultCache, open_store

    def to_serve(core: EngineCoreHandle, e: EngineArgs, name: str | None) -> ModelToServe:
        path = resolve_model_path(e.model)
        tokenizer = load_tokenizer(path)
        if template is not None:
            tokenizer.chat_template = template
        identity = {**e.output_identity(), "chat_template": args.chat_template}
        return ModelToServe(core, tokenizer, path, e.model, name, identity)

    store = open_store(args.result_cache, args.result_cache_ttl, args.result_cache_max_entries) \
        if args.result_cache else None  # a bad URL or bound fails here, while the cores still load
    served = [to_serve(core, e, name) for core, e, name in zip(cores, engine_args, names)]
    options = ServerOptions(
        api_key=args.api_key, max_waiting=args.max_waiting, log_prompts=args.log_prompts,
        limits=RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts,
                             auto_tool_choice=args.enable_auto_tool_choice),
        max_body_bytes=args.max_body_bytes, allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
        result_cache=ResultCache(store, args.result_cache) if store else None, metrics_prefix=args.metrics_prefix)
    return build_server_app(served, options)


def _start_core(engine_args: EngineArgs) -> EngineCoreHandle:
    """A core that builds its own engine where the engine surely runs on the CPU; otherwise the engine is built
    here first and, on the GPU, its core is a thread of this process (a CUDA context does not survive a fork)."""
    from tokenmill.engine.core_proc import start_built_engine_core, start_engine_core

    if _surely_cpu(engine_args.device):
        return start_engine_core(partial(_build_engine, engine_args))
    return start_built_engine_core(_build_engine(engine_args))


def _build_engine(engine_args: EngineArgs) -> LLMEngine:
    return engine_args.create_llm(progress=True).engine


def _surely_cpu(device: str) -> bool:
    """Whether `device` resolves to the CPU, known without importing torch: asked for, or "auto" where there is no
    NVIDIA driver (its control device) or no Triton, both of which the GPU path needs."""
    if device != "auto":
        return device == "cpu"
    return not (Path("/dev/nvidiactl").exists() and importlib.util.find_spec("triton") is not None)


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
