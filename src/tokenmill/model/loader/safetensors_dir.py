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

SUPPORTED_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                              "Gemma3ForCausalLM": "gemma3"}


def config_from_hf(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is missing or not valid JSON: {exc}") from exc
    archs = raw.get("architectures") or []
    hf_arch = next((a for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
    if hf_arch is None:
        raise UnsupportedModelError(
            f"{path}: architectures {archs} not supported; tokenmill runs {sorted(SUPPORTED_HF_ARCHITECTURES)}"
        )
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method not in (None, QUANT_METHOD):
        raise UnsupportedModelError(
            f"{path}: quantization_config.quant_method {method!r} is not supported; tokenmill loads float "
            f"checkpoints and its own quantized ones ({QUANT_METHOD!r}, written by `tokenmill quantize`)"
        )
    arch = SUPPORTED_HF_ARCHITECTURES[hf_arch]
    if raw.get("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{path}: attn_logit_softcapping={raw['attn_logit_softcapping']} is not supported")
    heads, layers = raw["num_attention_heads"], raw["num_hidden_layers"]
    bias = raw.get("attention_bias", False)
    rope_theta = _rope_theta(raw)
    local_theta = _rope_local_theta(raw, arch)
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", arch == "gemma3"),  # the HF config classes' defaults
        rope_scaling=_rope_scaling(raw),
        attention_bias=True if arch == "qwen2" else bias,  # Qwen2: biases on Q, K, V only, whatever the config
        attention_out_bias=False if arch == "qwen2" else bias,
        hidden_act=raw.get("hidden_activation") or raw.get("hidden_act") or "silu",
        qk_norm=arch == "gemma3",
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256) if arch == "gemma3" else None,
        layer_types=_layer_types(raw, hf_arch, layers),
        sliding_window=raw.get("sliding_window"),
        rope_local_theta=local_theta if local_theta not in (None, rope_theta) else None,
        final_logit_softcapping=raw.get("final_logit_softcapping"),
        name=raw.get("_name_or_path", path.name),
    )


def _layer_types(raw: dict, hf_arch: str, num_layers: int) -> tuple[str, ...] | None:
    """transformers >= 4.53 writes `layer_types`; older configs imply it, as their modeling code did."""
    if raw.get("layer_types"):
        return tuple(raw["layer_types"])
    if hf_arch == "Gemma3ForCausalLM":
        pattern = raw.get("sliding_window_pattern", 6)
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))
    if hf_arch == "MistralForCausalLM" and raw.get("sliding_window"):
        return ("sliding_attention",) * num_layers
    if raw.get("use_sliding_window") and raw.get("sliding_window"):  # Qwen2
        first = raw.get("max_window_layers", num_layers)
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    return None


def _rope_params(raw: dict) -> dict:
    """transformers >= 5 keeps theta and scaling in `rope_parameters` (per layer type for Gemma 3, where the
    full-attention entry is the main one); older configs at top level."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return params.get("full_attention", params)


def _rope_local_theta(raw: dict, arch: str) -> float | None:
    sliding = (raw.get("rope_parameters") or {}).get("sliding_attention")
    if sliding:
        return float(sliding["rope_theta"])
    return float(raw.get("rope_local_base_freq", 10000.0)) if arch == "gemma3" else None


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


def read_tensors(path: Path, config: ModelConfig) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Tensors under canonical names (no `model.` prefix); tokenmill-quantized matrices become QuantizedWeights.
    Gemma's norms compute x * (1 + w): their weights become the multiplier 1 + w, as GGUF stores them."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    if config.architecture == "gemma3":
        for name in tensors:
            if name.endswith("norm.weight"):
                tensors[name] = tensors[name].float() + 1
    try:
        return unpack_tensors(tensors)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
