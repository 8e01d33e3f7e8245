"""Key smoothing for the rotated KV caches (int4, turboquant): SmoothAttention (QServe, Lin et al., 2024).

Scores need only q.k, so each key channel may be divided by a factor s if the queries' same channel is
multiplied by it. Channels where keys are large and queries small spend a row's code range on what the scores
barely read; s = (rms of the key channel / rms of the query channel) ** ALPHA per layer, KV head and channel
(after RoPE, keys minus the layer's key offset) moves range to the channels queries read. The root mean squares
come from one uncached pass over the first CALIBRATION_TOKENS tokens of the shipped calibration text;
cache/kv_cache.py folds s into the rotation, so the kernels do no extra work. ALPHA = 0.25: of 0, 0.25 and 0.5
the only one that lowered the keys' attention KL on both SmolLM2 and Qwen2.5 (BENCHMARKS.md).

The pass adds seconds to a start on a 1.5B model, so the factors are kept under $TOKENMILL_CACHE_DIR/kv_smoothing,
keyed by a fingerprint of the model (its config, each tensor's name, shape, type and first and last bytes) and of
this calibration (FORMAT_VERSION, ALPHA, CALIBRATION_TOKENS)."""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader.catalog import get_cache_dir
from tokenmill.model.runner import uncached_inputs
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.texts import CALIBRATION_TEXT, shipped_text

logger = logging.getLogger("tokenmill.model")

ALPHA = 0.25
CALIBRATION_TOKENS = 256
FORMAT_VERSION = 1  # bump when what the factors are computed from changes
_SAMPLE = 1024  # elements of each tensor's start and end the fingerprint reads
_RATIO_RANGE = (1e-4, 1e4)  # a channel one side never uses gets a bounded factor, never 0 or inf


@contextmanager
def _observing(model: LlamaModel, observer) -> Iterator[None]:
    attentions = [layer.self_attn for layer in model.layers]
    for attention in attentions:
        attention.observer = observer
    try:
        yield
    finally:
        for attention in attentions:
            attention.observer = None


@torch.inference_mode()
def channel_rms(model: LlamaModel, token_ids: list[int], key_offsets: torch.Tensor | None) -> torch.Tensor:
    """[2, layers, kv_heads, head_dim] float64: the root mean square of each query channel (over the positions and
    the query heads of each KV head) and of each key channel (minus `key_offsets`), in one uncached pass."""
    config = model.config
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    squares = torch.zeros(2, config.num_layers, kv_heads, head_dim, dtype=torch.float64)

    def observe(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        squares[0, layer] += q.double().view(q.shape[0], kv_heads, -1, head_dim).pow(2).mean(2).sum(0)
        keys = k.double() if key_offsets is None else k.double() - key_offsets[layer].double()
        squares[1, layer] += keys.pow(2).sum(0)

    cache = KVCache(config, 1, 16, torch.float32)  # an uncached pass reads and writes no slot
    with _observing(model, observe):
        model.hidden_states(*uncached_inputs(token_ids, cache))  # no logits: the LM head's rows would be most of it
    return (squares / len(token_ids)).sqrt()


def key_smoothing(model: LlamaModel, tokenizer: Tokenizer, key_offsets: torch.Tensor | None,
                  cache: Path | None = None) -> torch.Tensor:
    """The keys' smoothing factors s [layers, kv_heads, head_dim] float32 (module docstring), from the cache
    folder (default: $TOKENMILL_CACHE_DIR/kv_smoothing) when it holds this model's, else computed and kept there."""
    config = model.config
    shape = (config.num_layers, config.num_kv_heads, config.head_dim)
    path = (cache or get_cache_dir() / "kv_smoothing") / f"{fingerprint(model)}.pt"
    try:
        factors = torch.load(path, weights_only=True)
        if factors.shape == shape and factors.dtype == torch.float32 and bool(factors.isfinite().all()):
            return factors
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        pass  # none yet, or unreadable: computed again and replaced
    ids = [t for t in tokenizer.encode(shipped_text(CALIBRATION_TEXT)) if t < config.vocab_size][:CALIBRATION_TOKENS]
    queries, keys = channel_rms(model, ids, key_offsets)  # (ids past the model's rows: a test model's tokenizer)
    factors = (keys / queries.clamp_min(1e-30)).clamp(*_RATIO_RANGE).pow(ALPHA).float()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as out:
            torch.save(factors, out)
        os.replace(out.name, path)
    except OSError as exc:  # a read-only cache costs the next start the pass again, nothing else
        logger.warning("could not keep the KV cache's key smoothing factors in %s: %s", path.parent, exc)
    return factors


def fingerprint(model: LlamaModel) -> str:
    """Names a model's factors: its config and every tensor's name, shape, type and first and last _SAMPLE
    elements, with this calibration's settings."""
    digest = hashlib.blake2b(f"{FORMAT_VERSION} {ALPHA} {CALIBRATION_TOKENS} {model.config!r}".encode(),
                             digest_size=12)
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        for part in (flat[:_SAMPLE], flat[-_SAMPLE:]):
            digest.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
