"""Hugging Face model directories: config.json + *.safetensors (sharded or not) + tokenizer.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tokenmill.config import ModelConfig, RopeScaling
from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.quant.checkpoint import QUANT_METHOD, unpack_tensors
from tokenmill.quant.weights import QuantizedWeight

SUPPORTED_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


def config_from_hf(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is missing or not valid JSON: {exc}") from exc
    archs = raw.get("architectures") or []
    arch = next((SUPPORTED_HF_ARCHITECTURES[a] for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{path}: architectures {archs} not supported; tokenmill runs {sorted(SUPPORTED_HF_ARCHITECTURES)}"
        )
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method not in (None, QUANT_METHOD):
        raise UnsupportedModelError(
            f"{path}: quantization_config.quant_method {method!r} is not supported; tokenmill loads float "
            f"checkpoints and its own quantized ones ({QUANT_METHOD!r}, written by `tokenmill quantize`)"
        )
    heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        rope_scaling=_rope_scaling(raw),
        attention_bias=raw.get("attention_bias", False),
        name=raw.get("_name_or_path", path.name),
    )


def _rope_params(raw: dict) -> dict:
    """transformers >= 5 keeps theta and scaling in `rope_parameters`; older configs at top level."""
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict) -> float:
    return float(_rope_params(raw).get("rope_theta") or raw.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict) -> RopeScaling | None:
    params = _rope_params(raw)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


def read_tensors(path: Path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """All tensors, named without the "model." prefix; tokenmill-quantized matrices become QuantizedWeights."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    try:
        return unpack_tensors(tensors)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
