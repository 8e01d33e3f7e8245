"""Shared fixtures: the real default model in float32 and bfloat16, and the transformers reference on the same GGUF.

Without a CUDA GPU, the GPU path's Triton kernels run under Triton's interpreter (tests/gpu). Triton reads
TRITON_INTERPRET when a kernel is defined, its own library's included, and test modules import it early (importing
transformers' models imports Triton), so it is set here, before any test module is collected."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenmill import LLM
from tokenmill.model.loader.default_model import default_model_path


@pytest.fixture(scope="session")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="session")
def llm_f32() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def llm_bf16() -> LLM:
    return LLM(dtype="bfloat16")


@pytest.fixture(scope="session")
def reference(gguf_path):
    """transformers' own GGUF loader and dequantizer: the oracle, used only in tests."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, gguf_path):
    """transformers' tokenizer of the default model, saved as tokenizer.json + tokenizer_config.json, to make
    HF checkpoint directories of small random models."""
    import transformers

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    return folder
