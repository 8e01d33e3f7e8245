"""A Checkpoint: everything read from a model's files (config, weights, tokenizer), before any module is built."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.loader import gguf as gguf_loader
from tokenmill.model.loader import gguf_tokenizer, resolve_model_path, safetensors_dir
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.quant.packed import PackedTensor
from tokenmill.quant.weights import QuantizedWeight

Weight = torch.Tensor | PackedTensor | QuantizedWeight


@dataclass
class Checkpoint:
    """Everything read from disk, before any module is built."""

    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: Tokenizer
    size_bytes: int

    @property
    def is_quantized(self) -> bool:
        return any(isinstance(w, QuantizedWeight) or (isinstance(w, PackedTensor) and w.is_quantized)
                   for w in self.weights.values())

    def weight_types(self) -> Counter[str]:
        """How many tensors of each storage type (GGUF quant type or torch dtype)."""
        return Counter(_storage_type(w) for w in self.weights.values())


def load_checkpoint(model: str | Path | None = None) -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_dir():
        return _load_hf_dir(path)
    return _load_gguf(path)


def _load_gguf(path: Path) -> Checkpoint:
    header = gguf_loader.open_gguf(path)
    meta = gguf_loader.read_metadata(header)
    config = gguf_loader.config_from_metadata(meta, {t.name for t in header.tensors})
    return Checkpoint(
        path=path,
        format="gguf",
        config=config,
        weights=gguf_loader.read_tensors(header, config),
        tokenizer=gguf_tokenizer(path, lambda: meta, decode_only=True),  # the engine's: see Tokenizer.loads
        size_bytes=path.stat().st_size,
    )


def _load_hf_dir(path: Path) -> Checkpoint:
    config = safetensors_dir.config_from_hf(path)
    return Checkpoint(
        path=path,
        format="safetensors",
        config=config,
        weights=safetensors_dir.read_tensors(path, config),
        tokenizer=Tokenizer.from_hf_dir(path),
        size_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
    )


def _storage_type(w: Weight) -> str:
    if isinstance(w, PackedTensor):
        return w.qtype.name
    if isinstance(w, QuantizedWeight):
        return w.format_name
    return str(w.dtype).removeprefix("torch.")
