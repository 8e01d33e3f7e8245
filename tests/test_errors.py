"""Bad input fails early with the exception type users catch and a message naming what was wrong;
a failed call leaves the LLM usable."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.config import SchedulerConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import ModelLoadError, TokenmillError, UnsupportedModelError

PROMPT = "The capital of France is"
SHORT = SamplingParams(temperature=0, max_tokens=2)


@pytest.fixture(scope="module")
def expected(llm_f32):
    """What a healthy engine answers: compared after every failure."""
    return llm_f32.generate(PROMPT, SHORT)[0].outputs[0].token_ids


def _still_works(llm, expected):
    assert not llm.engine.has_unfinished(), "a failed call left requests in the engine"
    out = llm.generate(PROMPT, SHORT)
    assert len(out) == 1 and out[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert message.startswith(field + " ")
    assert repr(next(iter(kwargs.values()))) in message  # and show the bad value


def test_empty_prompt_list(llm_f32, expected):
    with pytest.raises(ValueError, match="prompts"):
        llm_f32.generate([], SHORT)
    _still_works(llm_f32, expected)


def test_empty_prompt_string(llm_f32, expected):
    with pytest.raises(ValueError, match="prompt"):
        llm_f32.generate("", SHORT)
    with pytest.raises(ValueError, match="prompt"):
        llm_f32.generate({"prompt_token_ids": []}, SHORT)
    _still_works(llm_f32, expected)


def test_bad_prompt_in_a_batch_leaves_no_request_behind(llm_f32, expected):
    """The good prompts before the bad one must not stay queued (they would run inside the next call)."""
    with pytest.raises(ValueError, match="prompt"):
        llm_f32.generate([PROMPT, "Hello", ""], SHORT)
    _still_works(llm_f32, expected)


def test_prompt_token_ids_out_of_vocab(llm_f32, expected):
    vocab = llm_f32.config.vocab_size
    for bad in (vocab, vocab + 100, -1):
        with pytest.raises(ValueError, match="prompt token ids") as info:
            llm_f32.generate({"prompt_token_ids": [1, 2, bad]}, SHORT)
        assert str(bad) in str(info.value)
    _still_works(llm_f32, expected)


def test_prompt_longer_than_max_model_len(llm_f32, expected):
    limit = llm_f32.engine.max_model_len
    assert limit == llm_f32.config.max_position_embeddings == 8192
    with pytest.raises(ValueError, match="prompt has 8193 tokens") as info:
        llm_f32.generate({"prompt_token_ids": [100] * (limit + 1)}, SHORT)
    assert str(limit) in str(info.value)
    with pytest.raises(ValueError, match="prompt"):  # a prompt filling the context leaves no room for a token
        llm_f32.generate({"prompt_token_ids": [100] * limit}, SHORT)
    _still_works(llm_f32, expected)


def test_max_model_len_limits_prompt_and_output(llm_f32):
    """A smaller context (LLM(max_model_len=...)) rejects long text prompts and caps max_tokens to fit."""
    engine = LLMEngine(llm_f32.model, llm_f32.tokenizer, torch.float32,
                       scheduler_config=SchedulerConfig(max_model_len=16))
    with pytest.raises(ValueError, match="max_model_len is 16"):
        engine.add_request("long", "word " * 40, SHORT)
    assert not engine.has_unfinished()
    engine.add_request("fits", list(range(100, 114)),
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    final = None
    while engine.has_unfinished():
        final = engine.step()[-1]
    assert final.finished and len(final.outputs[0].token_ids) == 2  # 14 prompt tokens + 2 = 16
    assert final.outputs[0].finish_reason == "length"


def test_max_model_len_above_the_models_context_is_an_error(llm_f32):
    context = llm_f32.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_model_len={context * 4} is more than the model's context of {context}"):
        LLMEngine(llm_f32.model, llm_f32.tokenizer, torch.float32,
                  scheduler_config=SchedulerConfig(max_model_len=context * 4))


def test_error_during_generation_leaves_engine_usable(llm_f32, expected):
    """logprobs beyond the vocabulary can only fail once the logits exist, inside a step."""
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        llm_f32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, logprobs=10**6))
    _still_works(llm_f32, expected)


def test_unknown_model_path(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(missing))
    assert str(missing) in str(info.value)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as info:
        LLM(model=path)
    assert str(path) in str(info.value)


def test_truncated_gguf(tmp_path, gguf_path):
    """A real GGUF cut short (an interrupted download): header fine, tensor data missing."""
    path = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as src:
        path.write_bytes(src.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(ModelLoadError) as info:
        LLM(model=path)
    assert str(path) in str(info.value)


def _tiny_gguf(path, arch: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    _tiny_gguf(path, "mamba")
    with pytest.raises(UnsupportedModelError) as info:
        LLM(model=path)
    assert "mamba" in str(info.value)
    assert isinstance(info.value, TokenmillError)


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        LLM(model=tmp_path)
    assert "config.json" in str(info.value)
