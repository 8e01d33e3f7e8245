"""The KV cache's element type (CacheConfig.kv_cache_dtype): float16 by default under packed weights on the
native kernels (half the bytes a decode step streams at high concurrency), the compute dtype on the exact float
paths, and any of them on request; a float16 cache only rounds what it stores, an int8 one quantizes it per
token and head."""
from __future__ import annotations

import pytest
import torch

from tinymodel import write_tiny_llama
from tokenmill import LLM, SamplingParams
from tokenmill.cache.kv_cache import bytes_per_block, resolve_kv_dtype
from tokenmill.cli import build_parser
from tokenmill.config import CacheConfig
from tokenmill.kernels import native
from tokenmill.model.loader.checkpoint import load_checkpoint

PROMPTS = [{"prompt_token_ids": [(i * 7919 + j * 104729) % 40000 + 100 for i in range(n)]}
           for j, n in enumerate((5, 21, 40))]


def test_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int3")


def test_kv_cache_bits_is_turboquants_and_one_of_four():
    """Not silently ignored: bits with another type, or a width the codes do not have, are refused by name; on
    the command line too."""
    assert CacheConfig(kv_cache_dtype="turboquant", kv_cache_bits=2.5).kv_cache_bits == 2.5
    with pytest.raises(ValueError, match="kv_cache_bits sets turboquant's bits per element; kv_cache_dtype is 'int4'"):
        CacheConfig(kv_cache_dtype="int4", kv_cache_bits=3.5)
    with pytest.raises(ValueError, match="kv_cache_bits must be one of 2.5, 3.0, 3.5, 4.0, got 3.7"):
        CacheConfig(kv_cache_dtype="turboquant", kv_cache_bits=3.7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "turboquant", "--kv-cache-bits", "3.7"])
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "turboquant", "--kv-cache-bits", "3"])
    assert (args.kv_cache_dtype, args.kv_cache_bits) == ("turboquant", 3.0)


def test_kv_cache_smoothing_is_for_the_rotated_caches_in_one_process():
    with pytest.raises(ValueError, match="kv_cache_smoothing smooths the keys of the rotated caches"):
        CacheConfig(kv_cache_dtype="float16", kv_cache_smoothing=True)
    assert CacheConfig(kv_cache_dtype="turboquant", kv_cache_smoothing=True).kv_cache_smoothing
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "int4", "--no-kv-cache-smoothing"])
    assert args.kv_cache_smoothing is False
    assert build_parser().parse_args(["serve"]).kv_cache_smoothing is None
    with pytest.raises(ValueError, match="kv_cache_smoothing is not supported with tensor_parallel_size > 1"):
        LLM(kv_cache_dtype="int4", kv_cache_smoothing=True, tensor_parallel_size=2)


def test_auto_picks_float16_only_for_packed_weights_on_native_kernels():
    assert resolve_kv_dtype("auto", torch.float32, packed_weights=False) == torch.float32
    assert resolve_kv_dtype("auto", torch.bfloat16, packed_weights=True) == torch.bfloat16
    want = torch.float16 if native.available() else torch.float32
    assert resolve_kv_dtype("auto", torch.float32, packed_weights=True) == want
    assert resolve_kv_dtype("float32", torch.float32, packed_weights=True) == torch.float32
    assert resolve_kv_dtype("bfloat16", torch.float32, packed_weights=False) == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_llama(folder, load_checkpoint().tokenizer)
    return str(folder)


# int8 on this random tiny model: 0.02 measured on the first token (its keys' values are spread wide)
# int4 (rotated, 4 bits per group of 32): a first token flips at a 0.28 margin on this random model
# turboquant (rotated, Lloyd-Max codes at 3.5 bits: keys 4, values 3, one scale per row): as int4
@pytest.mark.parametrize("kv_cache_dtype,tolerance", [("float16", 1e-3), ("int8", 5e-2), ("int4", 5e-1),
                                                      ("turboquant", 5e-1)])
@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_narrow_cache_on_a_float_model_keeps_greedy_tokens_close(tiny_dir, monkeypatch, native_kernels, kv_cache_dtype,
                                                                  tolerance):
    """Float weights, float32 compute, a float16 or int8 cache: the cache holds fewer bytes per block, and greedy
    decoding gives the float32 cache's tokens up to near-ties (random tiny model: logits are close together, so
    the check is on logprobs of the float32 run's own tokens), on the native kernels and on plain PyTorch."""
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", native_kernels)
    native.library.cache_clear()
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
        exact = LLM(tiny_dir, dtype="float32", kv_cache_memory=2**22)
        narrow = LLM(tiny_dir, dtype="float32", kv_cache_memory=2**22, kv_cache_dtype=kv_cache_dtype)
        assert exact.engine.kv_cache.dtype == torch.float32
        assert narrow.engine.kv_cache.dtype == resolve_kv_dtype(kv_cache_dtype, torch.float32, False)
        config, block_size = exact.config, exact.engine.kv_cache.block_size
        cache = narrow.engine.kv_cache
        ratio = bytes_per_block(config, block_size, torch.float32) / bytes_per_block(config, block_size, cache.dtype,
                                                                                     cache.turbo)
        want = {"float16": 2, "int8": 4 * config.head_dim / (config.head_dim + 4),
                "int4": 4 * config.head_dim / (config.head_dim / 2 + 2 * config.head_dim / 32),
                "turboquant": 8 * config.head_dim / (3.5 * 2 * config.head_dim / 8 + 4)}[kv_cache_dtype]
        assert ratio == want
        for llm in (exact, narrow):
            c = llm.engine.kv_cache
            assert c.num_blocks == 2**22 // bytes_per_block(config, block_size, c.dtype, c.turbo)
        info = narrow.cache_info()
        assert (info.num_blocks, info.block_size, info.kv_cache_dtype, info.bytes_per_block) == (
            cache.num_blocks, block_size, kv_cache_dtype, bytes_per_block(config, block_size, cache.dtype, cache.turbo))
        assert info.kv_cache_bits == (3.5 if kv_cache_dtype == "turboquant" else None)
        a, b = exact.generate(PROMPTS, params), narrow.generate(PROMPTS, params)
        for x, y in zip(a, b):
            first = x.outputs[0].logprobs[0]
            token = x.outputs[0].token_ids[0]
            if y.outputs[0].token_ids[0] != token:  # int4 only: a near-tie (within the tolerance) may flip
                assert kv_cache_dtype in ("int4", "turboquant")
                top = sorted((lp.logprob for lp in first.values()), reverse=True)
                assert top[0] - top[1] < tolerance
                continue
            # the first token comes from the prompt's own K/V pass
            assert y.outputs[0].logprobs[0][token].logprob == pytest.approx(first[token].logprob, abs=tolerance)
            same = next((i for i, (s, t) in enumerate(zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
                         if s != t), 12)
            assert same >= (1 if kv_cache_dtype in ("int4", "turboquant") else 4)
    finally:
        native.library.cache_clear()
