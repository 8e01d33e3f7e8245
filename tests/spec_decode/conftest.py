"""The tiny random Llama (512-token vocabulary; the default model's tokenizer decodes its ids) most speculative
decoding tests run on, and its plain (no speculation) LLM."""
from __future__ import annotations

import pytest

from spec_cases import VOCAB
from tinymodel import write_tiny_llama
from tokenmill import LLM
from tokenmill.model.loader.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-spec")
    write_tiny_llama(folder, load_checkpoint().tokenizer, seed=3, vocab_size=VOCAB)
    return folder


@pytest.fixture(scope="module")
def plain(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24)
