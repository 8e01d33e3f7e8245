"""Build a runnable model from a Checkpoint: pick the architecture, convert and fuse weights, set dtype,
and (with a QuantConfig) swap linear and embedding layers for quantized ones."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tokenmill.config import QuantConfig
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import quant_ops
from tokenmill.model import weight_cache as weight_cache_entry
from tokenmill.model.gemma3 import Gemma3Model
from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear
from tokenmill.model.layers.rotary import RotaryEmbedding, inverse_frequencies
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader.checkpoint import Checkpoint, Weight
from tokenmill.quant.gguf_blocks import NATIVE_TYPES, repack
from tokenmill.quant.packed import PackedTensor
from tokenmill.quant.weights import QuantizedWeight, quantize_rtn

_FUSED = {  # fused parameter -> the checkpoint tensors concatenated along the output dim
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_EMBEDDING = "embed_tokens.weight"
MODEL_CLASSES: dict[str, type[LlamaModel]] = {"llama": LlamaModel, "qwen2": LlamaModel, "gemma3": Gemma3Model}


def _to_float(w: Weight) -> torch.Tensor:
    if isinstance(w, QuantizedWeight):
        return w.dequantize()
    return w.dequantize() if isinstance(w, PackedTensor) else w.float()


def build_model(ckpt: Checkpoint, dtype: torch.dtype, quant: QuantConfig | None = None,
                progress: bool = False, weight_cache: Path | None = None) -> LlamaModel:
    """weight_cache: the folder of repacked-weight entries (model/weight_cache.py) for a GGUF file's packed
    matrices; None: repack every time."""
    config = ckpt.config
    weights = dict(ckpt.weights)
    freq_factors = weights.pop("rope_freqs", None)
    rotary = RotaryEmbedding(
        inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                            _to_float(freq_factors) if freq_factors is not None else None),
        config.max_position_embeddings,
    )
    local_rotary = None
    if config.rope_local_theta is not None:  # sliding layers: their own base, no context-extension scaling
        local_rotary = RotaryEmbedding(inverse_frequencies(config.head_dim, config.rope_local_theta, None),
                                       config.max_position_embeddings)
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](config, rotary, local_rotary)
    wanted = set(model.state_dict())
    if config.tie_word_embeddings:
        wanted.discard("lm_head.weight")
        weights.pop("lm_head.weight", None)  # some HF checkpoints store the tied copy too
    matrices = _matrix_names(model) & wanted
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, list[QuantizedWeight]] = {}
    # Load the native kernels before the bar starts: a first start's build logs, a fallback warns, and either
    # printed under an active bar would break it.
    quant_ops.available()
    use_cache = weight_cache is not None and quant is not None and ckpt.path.is_file()
    fmt = f"{quant.method}:{quant.group_size}:{'tiled' if quant_ops.available() else 'rows'}" if quant else ""
    cached = weight_cache_entry.load(weight_cache, ckpt.path, fmt) if use_cache else None
    for name in tqdm(sorted(wanted), desc="loading weights", disable=not progress, unit="tensor"):
        if cached is not None:
            packed = cached.get(name)
        else:
            packed = _quantized(name, weights, ckpt.path, quant) if name in matrices else None
            packed = None if packed is None else [quant_ops.kernel_layout(w) for w in packed]
        if packed is not None:
            quantized[name] = packed
        else:
            state[name] = _gather(name, weights, ckpt.path).to(dtype)
    if use_cache and cached is None and quantized:
        weight_cache_entry.save(weight_cache, ckpt.path, fmt, quantized)
    extra = set(weights) - {p for name in wanted for p in _parts(name)}
    if extra:
        raise ModelLoadError(f"{ckpt.path}: tensors not used by the {config.architecture} model: {sorted(extra)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    for name, weight in quantized.items():
        _swap_in(model, name, weight, dtype)
    if config.tie_word_embeddings:
        embedding = model.embed_tokens
        if isinstance(embedding, QuantizedEmbedding):
            model.lm_head = QuantizedLinear([embedding.weight])
        else:
            model.lm_head.weight = embedding.weight
    return model.eval().requires_grad_(False)


def checkpoint_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """A float model's parameters under checkpoint names (build_model's inverse): fused projections split back
    into their parts, a tied LM head left out."""
    c = model.config
    rows = {"self_attn.q_proj": c.num_heads * c.head_dim, "self_attn.k_proj": c.num_kv_heads * c.head_dim,
            "self_attn.v_proj": c.num_kv_heads * c.head_dim, "mlp.gate_proj": c.intermediate_size,
            "mlp.up_proj": c.intermediate_size}
    out = {}
    for name, tensor in model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        fused = next((f for f in _FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        prefix, suffix = name.split(f".{fused}.")
        parts = _FUSED[fused]
        for part, piece in zip(parts, tensor.split([rows[p] for p in parts])):
            out[f"{prefix}.{part}.{suffix}"] = piece
    return out


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step streams from memory: every linear layer (the LM head included), but
    only one row of the embedding. At batch 1 this over the memory bandwidth bounds tokens/s."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def _matrix_names(model: nn.Module) -> set[str]:
    """Parameters that a quantized layer can hold: every linear weight and the token embedding."""
    return {f"{path}.weight" for path, module in model.named_modules() if isinstance(module, nn.Linear)} | {_EMBEDDING}


def _quantized(name: str, weights: dict[str, Weight], path: Path,
               quant: QuantConfig | None) -> list[QuantizedWeight] | None:
    """The packed weight of parameter `name` (one per storage format among its fused parts), or None where it
    stays a float tensor."""
    if quant is None:
        return None
    parts = [weights.get(p) for p in _parts(name)]
    if quant.method == "native" or all(isinstance(p, QuantizedWeight) for p in parts):
        packed = [p if isinstance(p, QuantizedWeight) else repack(p) for p in parts if _is_native(p)]
        return _merge_same_format(packed) if len(packed) == len(parts) else None
    bits = 8 if quant.method == "int8" or name in (_EMBEDDING, "lm_head.weight") else 4
    return [quantize_rtn(_gather(name, weights, path), bits, quant.group_size if bits == 4 else None)]


def _is_native(w: Weight | None) -> bool:
    return isinstance(w, QuantizedWeight) or (isinstance(w, PackedTensor) and w.qtype in NATIVE_TYPES)


def _merge_same_format(parts: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """Concatenate neighbouring parts that share a format, so a fused projection runs as few kernels as it can."""
    merged = [parts[0]]
    for p in parts[1:]:
        try:
            merged[-1] = QuantizedWeight.cat([merged[-1], p])
        except ValueError:
            merged.append(p)
    return merged


def _swap_in(model: LlamaModel, name: str, weights: list[QuantizedWeight], dtype: torch.dtype) -> None:
    module_path = name.removesuffix(".weight")
    parent_path, _, child = module_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    if isinstance(old, nn.Embedding):
        setattr(parent, child, QuantizedEmbedding(weights[0], dtype))
    else:
        bias = old.bias if old.bias is not None and not old.bias.is_meta else None
        setattr(parent, child, QuantizedLinear(weights, bias))


def _parts(name: str) -> tuple[str, ...]:
    """Checkpoint tensor names that make up model parameter `name`."""
    for fused, pieces in _FUSED.items():
        if f".{fused}." in name:
            prefix, suffix = name.split(f".{fused}.")
            return tuple(f"{prefix}.{p}.{suffix}" for p in pieces)
    return (name,)


def _gather(name: str, weights: dict[str, Weight], path: Path) -> torch.Tensor:
    missing = [p for p in _parts(name) if p not in weights]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing}")
    return torch.cat([_to_float(weights[p]) for p in _parts(name)], dim=0)
