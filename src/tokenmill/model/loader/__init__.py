"""Turn a model reference (None, a .gguf file, an HF directory, a catalog name) into a path and a tokenizer;
checkpoint.py reads the rest (config, weights). Nothing here imports torch: the server's API process loads its
tokenizers with this while its engine cores import torch and build the models."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenmill.model.loader.catalog import get_cache_dir, resolve_model
from tokenmill.model.loader.default_model import default_model_path
from tokenmill.model.loader.gguf_header import read_gguf_header
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.model.tokenizer import cache as tokenizer_cache


def resolve_model_path(model: str | Path | None) -> Path:
    """None -> the embedded default; an existing path -> itself; anything else -> a catalog name (see catalog.py)."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    return resolve_model(str(model))


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer (GGUF metadata or tokenizer.json): works whether or not tokenmill runs the architecture."""
    path = resolve_model_path(model)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    return gguf_tokenizer(path, lambda: read_gguf_header(path).metadata)


def gguf_tokenizer(path: Path, metadata: Callable[[], dict], decode_only: bool = False) -> Tokenizer:
    """From the tokenizer cache under $TOKENMILL_CACHE_DIR/tokenizers (decode_only: as Tokenizer.loads), built from
    the metadata on a miss."""
    return tokenizer_cache.cached(get_cache_dir() / "tokenizers", path,
                                  lambda: Tokenizer.from_gguf_metadata(metadata()), decode_only)
