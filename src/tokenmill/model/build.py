"""Build a runnable model from a Checkpoint: pick the architecture, convert and fuse weights, set dtype."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.rotary import RotaryEmbedding, inverse_frequencies
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader import Checkpoint, Weight
from tokenmill.model.loader.gguf import PackedTensor

_FUSED = {  # fused parameter -> the checkpoint tensors concatenated along the output dim
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _to_float(w: Weight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, PackedTensor) else w.float()


def build_model(ckpt: Checkpoint, dtype: torch.dtype, progress: bool = False) -> LlamaModel:
    config = ckpt.config
    weights = dict(ckpt.weights)
    freq_factors = weights.pop("rope_freqs", None)
    rotary = RotaryEmbedding(
        inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                            _to_float(freq_factors) if freq_factors is not None else None),
        config.max_position_embeddings,
    )
    with torch.device("meta"):
        model = LlamaModel(config, rotary)
    wanted = {name for name in model.state_dict() if not name.startswith("rotary.")}
    if config.tie_word_embeddings:
        wanted.discard("lm_head.weight")
        weights.pop("lm_head.weight", None)  # some HF checkpoints store the tied copy too
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(sorted(wanted), desc="loading weights", disable=not progress, unit="tensor"):
        state[name] = _gather(name, weights, ckpt.path).to(dtype)
    extra = set(weights) - {p for name in wanted for p in _parts(name)}
    if extra:
        raise ModelLoadError(f"{ckpt.path}: tensors not used by the {config.architecture} model: {sorted(extra)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


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

