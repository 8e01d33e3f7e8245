"""The `tokenmill` command: serve, generate, chat, info, models (and bench, eval, quantize)."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import uuid
from collections.abc import Iterator

from tokenmill.cli_serve import add_serve_parser
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


def cmd_info(args: argparse.Namespace) -> None:
    from tokenmill.model.loader.checkpoint import load_checkpoint

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

    add_serve_parser(sub)

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
