"""tokenmill-quantized checkpoints: a Hugging Face-style directory that `LLM(model=DIR)` loads directly.

Each quantized matrix `model.X.weight` is stored as `model.X.qweight`, `model.X.scales` and (int4) `model.X.mins`
in QuantizedWeight's own layout; the format is self-describing (uint8 codes: int4, int8 codes: int8; group size
from the scales' shape), so one file can mix int4 layers with an int8 embedding. Other tensors stay float.
config.json carries the usual HF fields plus `quantization_config` {"quant_method": "tokenmill", ...}; the
tokenizer is written as tokenizer.json + tokenizer_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.quant.weights import QuantizedWeight

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer

QUANT_METHOD = "tokenmill"
WEIGHTS_FILE = "model.safetensors"
_PARTS = ("qweight", "scales", "mins")
_UNPREFIXED = ("lm_head.", "rope_freqs")  # HF keeps these outside "model."


def _file_name(name: str) -> str:
    return name if name.startswith(_UNPREFIXED) else f"model.{name}"


def pack_tensors(weights: dict[str, torch.Tensor | QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Checkpoint weights (QuantizedWeight or float) -> flat safetensors entries."""
    tensors = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            base = _file_name(name.removesuffix(".weight"))
            w = w.untile()  # files hold the row layout
            for part in _PARTS:
                if getattr(w, part) is not None:
                    tensors[f"{base}.{part}"] = getattr(w, part).contiguous()
        else:
            tensors[_file_name(name)] = w.contiguous()
    return tensors


def unpack_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Inverse of pack_tensors (names already without "model."): each qweight/scales/mins triple -> one
    QuantizedWeight named `X.weight`; plain tensors pass through."""
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    quantized = {name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")}
    for base in quantized:
        try:
            qweight, scales = tensors[f"{base}.qweight"], tensors[f"{base}.scales"]
        except KeyError:
            raise ValueError(f"quantized tensor {base!r} has a qweight but no scales") from None
        bits = {torch.uint8: 4, torch.int8: 8}.get(qweight.dtype)
        if bits is None:
            raise ValueError(f"{base}.qweight has dtype {qweight.dtype}; expected uint8 (int4) or int8 (int8)")
        in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        out[f"{base}.weight"] = QuantizedWeight(bits, qweight, scales, tensors.get(f"{base}.mins"),
                                                in_features // scales.shape[1])
    parts = {f"{base}.{part}" for base in quantized for part in _PARTS}
    out.update((name, t) for name, t in tensors.items() if name not in parts)
    return out


def hf_config(config: ModelConfig, tokenizer: Tokenizer, quantization: dict) -> dict:
    """config.json for a Llama-family model, as transformers writes it (plus our quantization_config)."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": config.name,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_act": "silu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
        "quantization_config": {"quant_method": QUANT_METHOD, **quantization},
    }
    scaling = config.rope_scaling
    if scaling is not None:
        raw["rope_scaling"] = {"rope_type": scaling.kind, "factor": scaling.factor}
        if scaling.kind == "llama3":
            raw["rope_scaling"].update(low_freq_factor=scaling.low_freq_factor,
                                       high_freq_factor=scaling.high_freq_factor,
                                       original_max_position_embeddings=scaling.original_max_position_embeddings)
    return raw


def save_checkpoint(out: Path, config: ModelConfig, weights: dict[str, torch.Tensor | QuantizedWeight],
                    tokenizer: Tokenizer, quantization: dict, extra: dict | None = None) -> None:
    """extra: more top-level config.json entries (how the model was made)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(pack_tensors(weights), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    document = {**hf_config(config, tokenizer, quantization), **(extra or {})}
    (out / "config.json").write_text(json.dumps(document, indent=2) + "\n")
    tokenizer.save(out)
