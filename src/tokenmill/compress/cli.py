"""`tokenmill eval ppl` and `tokenmill quantize`: argument parsing; the work is in the modules."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tokenmill.config import QUANTIZATION_METHODS
from tokenmill.engine_args import EngineArgs

EVAL_TEXT = "eval_en.txt"
CALIBRATION_TEXT = "calibration_en.txt"


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="weight format: native (a quantized checkpoint's own blocks; the default with --dtype auto), "
                        "int8, int4 (round-to-nearest at load)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (inputs per scale)")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from tokenmill.compress.perplexity import perplexity, read_text, sliding_windows
    from tokenmill.hardware import describe

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    sliding_windows(2, args.context_len, args.stride)  # a bad window fails before the model loads
    text = read_text(args.dataset, EVAL_TEXT)
    llm = EngineArgs(args.model, args.dtype, args.quantization, args.group_size,
                     kv_cache_memory=16 * 2**20).create_llm(progress=True)
    if args.context_len > llm.engine.max_model_len:
        raise ValueError(f"--context-len {args.context_len} exceeds the model's context {llm.engine.max_model_len}")
    ids = llm.tokenizer.encode(text)[: args.max_tokens]
    result = perplexity(llm.score, ids, args.context_len, args.stride, progress=True)
    quant = llm.quant_config
    print(f"model         {llm.checkpoint.path}")
    print(f"dataset       {args.dataset or f'builtin ({EVAL_TEXT})'}, {len(ids)} tokens")
    method = (quant.method + (f" g{quant.group_size}" if quant.method == "int4" else "")) if quant else "none"
    print(f"weights       dtype {str(llm.dtype).removeprefix('torch.')}, quantization {method}")
    print(f"perplexity    {result.perplexity:.4f}  (mean NLL {result.nll:.5f} nats)")
    print(f"scored        {result.num_tokens} tokens in {result.num_windows} windows "
          f"(context {result.context_len}, stride {result.stride})")
    print(f"time          {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)")
    if args.save_result:
        document = {"model": str(llm.checkpoint.path), "dataset": str(args.dataset or EVAL_TEXT),
                    "dtype": str(llm.dtype).removeprefix("torch."),
                    "quantization": asdict(quant) if quant else None,
                    **asdict(result), "tokens_per_second": result.tokens_per_second, "hardware": describe()}
        Path(args.save_result).write_text(json.dumps(document, indent=2) + "\n")


def cmd_quantize(args: argparse.Namespace) -> None:
    from tokenmill.compress.perplexity import read_text
    from tokenmill.compress.quantize import QuantizeOptions, check_output_dir, quantize_checkpoint
    from tokenmill.model.loader import load_checkpoint

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


def add_compress_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate model quality")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity over a text with a sliding window")
    ppl.add_argument("model", nargs="?", default=None, metavar="MODEL",
                     help="a .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
    ppl.add_argument("--dataset", default=None, help=f"a UTF-8 text file (default: the shipped held-out {EVAL_TEXT})")
    ppl.add_argument("--context-len", type=int, default=512, help="most tokens the model sees per window")
    ppl.add_argument("--stride", type=int, default=256, help="new tokens scored per window (< context-len)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    ppl.add_argument("--save-result", default=None, metavar="FILE.json")
    _add_weight_args(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)

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
