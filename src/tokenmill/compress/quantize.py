"""Post-training quantization of a float checkpoint (an HF directory, or a GGUF whose blocks are dequantized first)
with plain round-to-nearest or a calibrated algorithm (AWQ, GPTQ), and the tokenmill checkpoint it is saved as.

Decoder linears get `method` (int4 per group_size inputs, float16 scale and min; or int8 per output channel);
the token embedding and an untied LM head stay int8 per channel, as in QuantConfig's int4.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill.cache.kv_cache import KVCache
from tokenmill.compress.awq import awq
from tokenmill.compress.calibration import LinearInputs, record_linear_inputs
from tokenmill.compress.gptq import gptq
from tokenmill.compress.perplexity import Scorer
from tokenmill.config import ModelConfig
from tokenmill.model.build import build_model
from tokenmill.model.loader.checkpoint import Checkpoint, Weight
from tokenmill.model.runner import ModelRunner
from tokenmill.quant.checkpoint import save_checkpoint
from tokenmill.quant.grid import Grid
from tokenmill.quant.packed import PackedTensor
from tokenmill.quant.weights import QuantizedWeight

METHODS = ("int8", "int4")
ALGORITHMS = ("rtn", "awq", "gptq")
_KEEP_INT8 = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "int4"
    group_size: int = 32
    algorithm: str = "rtn"
    seq_len: int = 512  # calibration chunk length

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        if self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")

    @property
    def grid(self) -> Grid:
        """The decoder linears' grid."""
        return Grid(4, self.group_size, torch.float16) if self.method == "int4" else Grid(8, None)

    def grid_for(self, name: str) -> Grid:
        return Grid(8, None) if name in _KEEP_INT8 else self.grid

    def check_model(self, config: ModelConfig) -> None:
        """int4 groups must divide every decoder linear's input size; say which sizes would."""
        common = math.gcd(config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim)
        if self.method == "int4" and common % self.group_size:
            valid = [g for g in range(32, common + 1, 32) if common % g == 0]
            raise ValueError(f"group_size {self.group_size} does not divide the linear layers' input sizes "
                             f"(hidden {config.hidden_size}, intermediate {config.intermediate_size}); "
                             f"this model takes group_size {', '.join(map(str, valid)) or 'none (use int8)'}")

    def config_dict(self) -> dict:
        return {"bits": self.grid.bits, "group_size": self.grid.group_size, "algorithm": self.algorithm,
                "embedding_bits": 8}


def float_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor as float32 (quantized blocks dequantized); a tied LM head's copy dropped."""
    def to_float(w: Weight) -> torch.Tensor:
        return w.dequantize() if isinstance(w, (PackedTensor, QuantizedWeight)) else w.float()

    return {name: to_float(w) for name, w in ckpt.weights.items()
            if not (ckpt.config.tie_word_embeddings and name == "lm_head.weight")}


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Logits at every position of one sequence, with no KV cache beyond a placeholder block."""
    return ModelRunner(model, KVCache(model.config, 1, 1, torch.float32)).score


def calibrate(ckpt: Checkpoint, ids: list[int], seq_len: int = 512, progress: bool = False) -> dict[str, LinearInputs]:
    """Input statistics of every decoder linear of the float model, over `ids` in chunks of `seq_len`."""
    model = build_model(ckpt, torch.float32)
    return record_linear_inputs(model, model_scorer(model), ids, seq_len, progress=progress)


def quantize_weights(ckpt: Checkpoint, options: QuantizeOptions, calibration_ids: list[int] | None = None,
                     progress: bool = False, inputs: dict[str, LinearInputs] | None = None) -> dict[str, Weight]:
    """Checkpoint-named weights: QuantizedWeight for every matrix, float32 for the rest. Calibrated algorithms
    record `inputs` from `calibration_ids` unless given (one calibration can serve several configurations)."""
    options.check_model(ckpt.config)
    floats = float_weights(ckpt)
    quantized: dict[str, QuantizedWeight] = {}
    clips: dict[str, torch.Tensor] = {}
    if options.algorithm != "rtn":
        if inputs is None:
            if not calibration_ids:
                raise ValueError(f"algorithm {options.algorithm!r} needs calibration tokens")
            inputs = calibrate(ckpt, calibration_ids, options.seq_len, progress)
        if options.algorithm == "awq":
            result = awq(floats, ckpt.config, inputs, options.grid, progress=progress)
            floats, clips = result.weights, result.clips
        else:
            quantized = gptq(floats, ckpt.config, inputs, options.grid, progress=progress)
    out: dict[str, Weight] = {}
    for name, w in tqdm(floats.items(), desc="quantizing", total=len(floats), unit="tensor", disable=not progress):
        if name in quantized:
            out[name] = quantized[name]
        elif w.dim() == 2:
            out[name] = options.grid_for(name).quantize(w, clips.get(name, 1.0))
        else:
            out[name] = w
    return out


@dataclass
class QuantizeReport:
    out: Path
    seconds: float
    num_quantized: int
    size_bytes: int


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {str(out)!r} already exists and is not empty")


def quantize_checkpoint(ckpt: Checkpoint, out: Path, options: QuantizeOptions, calibration_text: str | None,
                        progress: bool = False) -> QuantizeReport:
    """Quantize and save as a tokenmill checkpoint directory (which must be new or empty)."""
    check_output_dir(out)
    started = time.perf_counter()
    ids = ckpt.tokenizer.encode(calibration_text) if calibration_text is not None else None
    weights = quantize_weights(ckpt, options, ids, progress)
    save_checkpoint(out, ckpt.config, weights, ckpt.tokenizer, options.config_dict())
    return QuantizeReport(out, time.perf_counter() - started,
                          sum(isinstance(w, QuantizedWeight) for w in weights.values()),
                          sum(f.stat().st_size for f in out.glob("*.safetensors")))
