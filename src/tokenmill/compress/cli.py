"""`tokenmill eval ppl|kld|passkey`, `tokenmill quantize` and `tokenmill distill`: argument parsing; the work is
in the modules."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.config import KV_CACHE_BITS, KV_CACHE_DTYPES, QUANTIZATION_METHODS
from tokenmill.engine_args import EngineArgs
from tokenmill.texts import CALIBRATION_TEXT, EVAL_TEXT, shipped_text

if TYPE_CHECKING:
    import torch

    from tokenmill.llm import LLM

CACHED_CHUNK = 64  # tokens per step when scoring through the KV cache


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--dataset", default=None, help=f"a UTF-8 text file (default: the shipped held-out {EVAL_TEXT})")
    p.add_argument("--context-len", type=int, default=512, help="most tokens the model sees per window")
    p.add_argument("--stride", type=int, default=256, help="new tokens scored per window (< context-len)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--max-num-batched-tokens", type=int, default=CACHED_CHUNK,
                   help="tokens per step when scoring through the KV cache: in small chunks nearly every token "
                        "attends to keys the cache stored (compressed ones as compressed)")
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    _add_weight_args(p)


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="weight format: native (a quantized checkpoint's own blocks; the default with --dtype auto), "
                        "int8, int4 (round-to-nearest at load)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (inputs per scale)")


def _add_kv_code_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-bits", type=float, default=None, choices=KV_CACHE_BITS,
                   help="turboquant's bits per element (default 3.5)")
    p.add_argument("--kv-cache-smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="int4, turboquant: keys smoothed by calibrated per-channel factors (default: on)")
    p.add_argument("--kv-cache-recent-blocks", type=int, default=None, metavar="N",
                   help="compressed caches: each query's aligned group of N blocks, up to its own, read from "
                        "float16 twins (default: 2 for int4 and turboquant)")


def _kv_codes(args: argparse.Namespace) -> dict:
    """The compressed cache's settings asked for (_add_kv_code_args)."""
    return {"kv_cache_bits": args.kv_cache_bits, "kv_cache_smoothing": args.kv_cache_smoothing,
            "kv_cache_recent_blocks": args.kv_cache_recent_blocks}


def _cache_name(llm: LLM) -> str:
    info = llm.cache_info()
    bits = f" {info.kv_cache_bits} bits" if info.kv_cache_bits else ""
    recent = info.kv_cache_recent_blocks
    return (info.kv_cache_dtype + bits + (", keys smoothed" if llm.engine.kv_cache.smoothed else "")
            + (f", {recent} recent blocks in float16" if recent else ""))


def _eval_llm(args: argparse.Namespace, kv_cache_dtype: str = "auto", **kv_codes) -> LLM:
    """The model to evaluate; a KV cache that holds any window (backed lazily: only the blocks in use cost);
    kv_codes: a compressed cache's settings (_kv_codes)."""
    llm = EngineArgs(args.model, args.dtype, args.quantization, args.group_size, kv_cache_memory=2**30,
                     kv_cache_dtype=kv_cache_dtype, **kv_codes).create_llm(progress=True)
    if args.context_len > llm.engine.max_model_len:
        raise ValueError(f"--context-len {args.context_len} exceeds the model's context {llm.engine.max_model_len}")
    return llm


def _eval_text(args: argparse.Namespace) -> str:
    """The text to score, once the arguments check out: bad ones fail before a model loads."""
    from tokenmill.compress.perplexity import read_text, sliding_windows

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    sliding_windows(2, args.context_len, args.stride)
    if args.max_num_batched_tokens < 1:
        raise ValueError(f"--max-num-batched-tokens must be >= 1, got {args.max_num_batched_tokens}")
    return read_text(args.dataset, EVAL_TEXT)


def _cache_scorer(llm: LLM, chunk: int) -> Callable[[Sequence[int]], torch.Tensor]:
    return lambda ids: llm.engine.score_through_cache(list(ids), chunk)


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from tokenmill.compress.perplexity import perplexity
    from tokenmill.hardware import describe

    if args.kv_cache_dtype is None and args.max_num_batched_tokens != CACHED_CHUNK:
        raise ValueError("--max-num-batched-tokens sets the chunks of scoring through the KV cache: it needs "
                         "--kv-cache-dtype (without it, each window is scored in one uncached pass)")
    text = _eval_text(args)
    llm = _eval_llm(args, args.kv_cache_dtype or "auto", **_kv_codes(args))
    ids = llm.tokenizer.encode(text)[: args.max_tokens]
    score = llm.score if args.kv_cache_dtype is None else _cache_scorer(llm, args.max_num_batched_tokens)
    result = perplexity(score, ids, args.context_len, args.stride, progress=True)
    quant = llm.quant_config
    print(f"model         {llm.checkpoint.path}")
    print(f"dataset       {args.dataset or f'builtin ({EVAL_TEXT})'}, {len(ids)} tokens")
    method = (quant.method + (f" g{quant.group_size}" if quant.method == "int4" else "")) if quant else "none"
    print(f"weights       dtype {str(llm.dtype).removeprefix('torch.')}, quantization {method}")
    cache = (f"{_cache_name(llm)}, in the loop ({args.max_num_batched_tokens}-token chunks)"
             if args.kv_cache_dtype else "none (each window in one uncached pass)")
    print(f"KV cache      {cache}")
    print(f"perplexity    {result.perplexity:.4f}  (mean NLL {result.nll:.5f} nats)")
    print(f"scored        {result.num_tokens} tokens in {result.num_windows} windows "
          f"(context {result.context_len}, stride {result.stride})")
    print(f"time          {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)")
    if args.save_result:
        document = {"model": str(llm.checkpoint.path), "dataset": str(args.dataset or EVAL_TEXT),
                    "dtype": str(llm.dtype).removeprefix("torch."),
                    "quantization": asdict(quant) if quant else None,
                    "kv_cache_dtype": llm.cache_info().kv_cache_dtype if args.kv_cache_dtype else None,
                    "kv_cache_smoothed": llm.engine.kv_cache.smoothed,
                    "kv_cache_recent_blocks": llm.engine.kv_cache.recent_blocks,
                    **asdict(result), "tokens_per_second": result.tokens_per_second, "hardware": describe()}
        Path(args.save_result).write_text(json.dumps(document, indent=2) + "\n")


def cmd_eval_kld(args: argparse.Namespace) -> None:
    from tokenmill.compress.kld import kl_divergence
    from tokenmill.hardware import describe

    text = _eval_text(args)
    reference = _eval_llm(args, args.reference_kv_cache_dtype)
    test = _eval_llm(args, args.kv_cache_dtype, **_kv_codes(args))
    ids = reference.tokenizer.encode(text)[: args.max_tokens]
    chunk = args.max_num_batched_tokens
    result = kl_divergence(_cache_scorer(reference, chunk), _cache_scorer(test, chunk), ids, args.context_len,
                           args.stride, progress=True)
    names = f"{_cache_name(test)} against {_cache_name(reference)}"
    print(f"model         {reference.checkpoint.path}")
    print(f"KV cache      {names}, in the loop ({chunk}-token chunks)")
    print(f"KLD           mean {result.mean:.6f}, median {result.median:.6f}, p99 {result.p99:.6f}, "
          f"max {result.max:.6f} nats")
    print(f"same top-1    {100 * result.top1_agreement:.2f}%")
    print(f"perplexity    {result.test_perplexity:.4f} against {result.reference_perplexity:.4f} "
          f"({100 * result.perplexity_change:+.2f}%)")
    print(f"scored        {result.num_tokens} tokens (context {args.context_len}, stride {args.stride}) in "
          f"{result.seconds:.1f} s")
    if args.save_result:
        document = {"model": str(reference.checkpoint.path), "dataset": str(args.dataset or EVAL_TEXT),
                    "kv_cache_dtype": test.cache_info().kv_cache_dtype, "kv_cache_bits": args.kv_cache_bits,
                    "kv_cache_smoothed": test.engine.kv_cache.smoothed,
                    "kv_cache_recent_blocks": test.engine.kv_cache.recent_blocks,
                    "reference_kv_cache_dtype": reference.cache_info().kv_cache_dtype, "chunk": chunk,
                    "context_len": args.context_len, "stride": args.stride, **asdict(result),
                    "perplexity_change": result.perplexity_change, "hardware": describe()}
        Path(args.save_result).write_text(json.dumps(document, indent=2) + "\n")


def cmd_eval_passkey(args: argparse.Namespace) -> None:
    from tokenmill.compress.passkey import run_passkey
    from tokenmill.hardware import describe

    if min(args.lengths) < 64 or not all(0 <= d <= 1 for d in args.depths):
        raise ValueError("--lengths must be >= 64 tokens and --depths fractions in [0, 1]")
    llm = EngineArgs(args.model, args.dtype, args.quantization, args.group_size, kv_cache_memory=2**31,
                     kv_cache_dtype=args.kv_cache_dtype, **_kv_codes(args), max_model_len=max(args.lengths) + 64,
                     max_num_batched_tokens=args.max_num_batched_tokens).create_llm(progress=True)
    trials = run_passkey(llm, args.lengths, args.depths, args.seed, progress=True)
    print(f"model         {llm.checkpoint.path}")
    print(f"KV cache      {_cache_name(llm)} (prefill in {args.max_num_batched_tokens}-token chunks)")
    for length in args.lengths:
        mine = [t for t in trials if t.length == length]
        found = "".join("+" if t.found else "-" for t in mine)
        print(f"{length:>6} tokens  {sum(t.found for t in mine)}/{len(mine)} found  (depths {args.depths}: {found})")
    if args.save_result:
        document = {"model": str(llm.checkpoint.path), "kv_cache_dtype": llm.cache_info().kv_cache_dtype,
                    "kv_cache_bits": args.kv_cache_bits, "kv_cache_smoothed": llm.engine.kv_cache.smoothed,
                    "kv_cache_recent_blocks": llm.engine.kv_cache.recent_blocks,
                    "trials": [{**asdict(t), "found": t.found} for t in trials], "hardware": describe()}
        Path(args.save_result).write_text(json.dumps(document, indent=2) + "\n")


def cmd_quantize(args: argparse.Namespace) -> None:
    from tokenmill.compress.perplexity import read_text
    from tokenmill.compress.quantize import QuantizeOptions, check_output_dir, quantize_checkpoint
    from tokenmill.model.loader.checkpoint import load_checkpoint

    options = QuantizeOptions(args.method, args.group_size, args.algorithm)  # bad options fail before loading
    if args.calibration is not None and options.algorithm == "rtn":
        raise ValueError("--calibration is only used by --algorithm awq or gptq")
    check_output_dir(Path(args.output))
    text = None if options.algorithm == "rtn" else read_text(args.calibration, CALIBRATION_TEXT)
    ckpt = load_checkpoint(args.model)
    report = quantize_checkpoint(ckpt, Path(args.output), options, text, progress=True)
    grid = options.grid
    print(f"wrote {report.out}: {report.num_quantized} matrices as int{grid.bits}"
          f"{f' g{grid.group_size}' if grid.group_size else ' per channel'} ({options.algorithm}), "
          f"{report.size_bytes / 2**20:.1f} MiB, in {report.seconds:.1f} s")


def cmd_distill(args: argparse.Namespace) -> None:
    from tokenmill.compress.distill import DistillOptions, chat_answers, distill, teacher_samples
    from tokenmill.compress.perplexity import read_text
    from tokenmill.compress.quantize import check_output_dir
    from tokenmill.hardware import describe

    options = DistillOptions(
        method=args.method, params_fraction=args.params_fraction, exit_layer=args.exit_layer,
        group_size=args.qad_group_size, minutes=args.minutes,
        seq_len=args.seq_len, top_k=args.top_k, lr=args.lr, sample_tokens=args.sample_tokens,
        chat_answers=args.chat_answers, eval_tokens=args.eval_tokens, seed=args.seed, resume=args.resume)
    out = Path(args.out)
    if not args.resume:
        check_output_dir(out)
    teacher = EngineArgs(args.model, args.dtype, args.quantization, args.group_size).create_llm(progress=True)
    encode = teacher.tokenizer.encode
    texts = [read_text(path, CALIBRATION_TEXT) for path in args.data or [None]]
    train = [encode(text) for text in texts]
    train += teacher_samples(teacher, train[0], options.sample_tokens, options.seed)
    train += chat_answers(teacher, options.chat_answers, options.seed)
    eval_ids = encode(shipped_text(EVAL_TEXT))[: options.eval_tokens]
    result = distill(teacher, train, eval_ids, out, options, progress=True)
    share = result.student_params / result.teacher_params
    print(f"student       {out}: {result.student_params / 1e6:.1f}M of the teacher's "
          f"{result.teacher_params / 1e6:.1f}M parameters ({100 * share:.0f}%), layers {result.dropped_layers} "
          f"dropped; before training: {out / 'pruned'}")
    print(f"trained       {result.steps} steps, {result.tokens} tokens ({sum(map(len, train))} distinct) in "
          f"{result.seconds:.0f} s")
    before = {"depth": "pruned", "early-exit": "raw exit", "qad": "int4 RTN"}[options.method]
    for name, kld in ((before, result.pruned),
                      ("distilled", result.distilled)):
        print(f"{name:<13} KL to the teacher {kld.mean:.4f} nats, same top-1 {100 * kld.top1_agreement:.1f}%, "
              f"perplexity {kld.test_perplexity:.3f} (teacher {kld.reference_perplexity:.3f}) on {EVAL_TEXT}")
    if args.save_result:
        document = {"teacher": str(teacher.checkpoint.path), "options": asdict(options),
                    **{k: v for k, v in asdict(result).items() if k != "losses"}, "losses": result.losses[::10],
                    "hardware": describe()}
        Path(args.save_result).write_text(json.dumps(document, indent=2) + "\n")


def add_compress_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate model quality")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity over a text with a sliding window")
    _add_eval_args(ppl)
    ppl.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                     help="score through a KV cache of this type, in chunks (default: each window in one uncached "
                          "pass)")
    _add_kv_code_args(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)
    kld = ev_sub.add_parser("kld", help="KL divergence of next-token distributions with a KV cache type against "
                                        "another (default float16), both in the loop")
    _add_eval_args(kld)
    kld.add_argument("--kv-cache-dtype", required=True, choices=KV_CACHE_DTYPES)
    kld.add_argument("--reference-kv-cache-dtype", default="float16", choices=KV_CACHE_DTYPES)
    _add_kv_code_args(kld)
    kld.set_defaults(func=cmd_eval_kld)
    pk = ev_sub.add_parser("passkey", help="passkey retrieval: a number hidden at depths of long filler text")
    _add_model_arg(pk)
    pk.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="where the key sits, as fractions of the filler")
    pk.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    _add_kv_code_args(pk)
    pk.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk")
    pk.add_argument("--seed", type=int, default=0, help="draws the keys")
    pk.add_argument("--save-result", default=None, metavar="FILE.json")
    _add_weight_args(pk)
    pk.set_defaults(func=cmd_eval_passkey)

    qz = sub.add_parser("quantize", help="post-training quantization of a float model to a tokenmill checkpoint")
    qz.add_argument("model", nargs="?", default=None, metavar="MODEL",
                    help="a .gguf file (quantized blocks are dequantized first) or HF directory (default: the "
                         "embedded SmolLM2-135M-Instruct)")
    qz.add_argument("--method", required=True, choices=["int8", "int4"])
    qz.add_argument("--group-size", type=int, default=32, help="int4 inputs per scale: 32, 64, 128, ...")
    qz.add_argument("--algorithm", default="rtn", choices=["rtn", "awq", "gptq"],
                    help="rtn: round to nearest; awq: activation-aware scaling and clipping; gptq: error feedback")
    qz.add_argument("--calibration", default=None, metavar="FILE",
                    help=f"calibration text for awq/gptq (default: the shipped {CALIBRATION_TEXT})")
    qz.add_argument("-o", "--output", required=True, metavar="OUT", help="new checkpoint directory")
    qz.set_defaults(func=cmd_quantize)
    ds = sub.add_parser("distill", help="a smaller student of a model, a draft for it or its int4 version, trained by "
                                        "knowledge distillation on this CPU within a time budget")
    _add_model_arg(ds)
    ds.add_argument("--out", required=True, metavar="DIR", help="the student (DIR/pruned: before training)")
    ds.add_argument("--minutes", type=float, default=10.0, help="training time")
    ds.add_argument("--params-fraction", type=float, default=0.7, help="student parameters / teacher parameters")
    ds.add_argument("--method", default="depth", choices=["depth", "early-exit", "qad"],
                    help="depth: drop the layers of least block influence, then distill; early-exit: a draft of the "
                         "model's first --exit-layer layers and a trained exit layer; qad: the model's weights "
                         "trained through int4 rounding, saved as int4")
    ds.add_argument("--qad-group-size", type=int, default=64, help="qad: int4 inputs per scale and min")
    ds.add_argument("--exit-layer", type=int, default=None,
                    help="early-exit: the model's layers the draft keeps (default: half of them)")
    ds.add_argument("--data", nargs="+", default=None, metavar="FILE",
                    help=f"training text files (default: the shipped {CALIBRATION_TEXT}); the teacher's samples "
                         "continuing the first are added")
    ds.add_argument("--sample-tokens", type=int, default=16384, help="teacher samples to add to the training text")
    ds.add_argument("--chat-answers", type=int, default=1,
                    help="the teacher's answers to each built-in prompt to add (greedy, then sampled at 0.8); those "
                         "benchmarks hold out for their chat and code workloads are never used")
    ds.add_argument("--seq-len", type=int, default=256)
    ds.add_argument("--top-k", type=int, default=64, help="teacher tokens per position in the KL")
    ds.add_argument("--lr", type=float, default=1e-4)
    ds.add_argument("--eval-tokens", type=int, default=2048, help=f"held-out tokens of {EVAL_TEXT} for the KL")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--resume", action="store_true",
                    help="continue from DIR/trainer_state.pt (written every minute) until --minutes of training; "
                         "give the same other options")
    ds.add_argument("--save-result", default=None, metavar="FILE.json")
    _add_weight_args(ds)
    ds.set_defaults(func=cmd_distill)
