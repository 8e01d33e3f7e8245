"""SentencePiece ('llama') GGUF vocabularies on a small synthetic vocabulary, against transformers' GGUF builder.

Fast: the vocabulary is learned here from the test texts (characters, then frequent substrings, scored by rank),
with byte-fallback tokens, control tokens and Gemma's user-defined newline and space runs. The real Gemma 3
vocabulary is checked in test_model_tokenizers.py (slow).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tokenizer_texts import DIGITS_AFTER_WHITESPACE, SENTENCEPIECE_TEXTS, TEXTS
from tokenmill.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ALL_TEXTS = TEXTS + DIGITS_AFTER_WHITESPACE + SENTENCEPIECE_TEXTS
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _vocabulary(arch: str) -> dict[str, Any]:
    """GGUF tokenizer metadata for a vocabulary learned from ALL_TEXTS; pieces beyond it fall back to bytes."""
    specials = [("<pad>", _CONTROL), ("<eos>", _CONTROL), ("<bos>", _CONTROL), ("<unk>", _UNKNOWN)]
    specials += [("<start_of_turn>", _CONTROL), ("<end_of_turn>", _CONTROL), ("<think>", _USER_DEFINED)]
    specials += [("\n" * n, _USER_DEFINED) for n in (1, 2, 3)] + [(" " * n, _USER_DEFINED) for n in (2, 3)]
    specials += [(f"<0x{byte:02X}>", _BYTE) for byte in range(256)]
    corpus = [text.replace(" ", "\u2581") for text in ALL_TEXTS] + ["\u2581" + t for t in ALL_TEXTS]
    left_out = set("😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈❤✨한국어")  # so these reach BPE with no piece: byte fallback
    chars = sorted({c for text in corpus for c in text if c not in left_out})
    counts = Counter(text[i : i + n] for text in corpus for n in range(2, 7) for i in range(len(text) - n + 1))
    pieces = chars + [piece for piece, count in counts.most_common() if count > 1 and piece not in chars][:400]
    taken = {token for token, _ in specials}
    pieces = [piece for piece in pieces if piece not in taken]
    tokens = [token for token, _ in specials] + pieces
    return {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        # Unlike Gemma's files, these scores disagree with the pieces' file order, so the two rankings differ.
        "tokenizer.ggml.scores": [0.0] * len(specials) + [-float(len(p)) - i / 1000 for i, p in enumerate(pieces)],
        "tokenizer.ggml.token_type": [kind for _, kind in specials] + [_NORMAL] * len(pieces),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
    }


def _reference(metadata: dict[str, Any]) -> Any:
    """transformers' backend for the same metadata, built as AutoTokenizer(gguf_file=...) builds it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": metadata["tokenizer.ggml.tokens"],
        "scores": metadata["tokenizer.ggml.scores"],
        "token_type": metadata["tokenizer.ggml.token_type"],
    }
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return backend


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any, dict[str, Any]]:
    metadata = _vocabulary(request.param)
    if request.param == "gemma3":
        metadata["tokenizer.ggml.add_space_prefix"] = False  # as Gemma files say
    return Tokenizer.from_gguf_metadata(metadata), _reference(metadata), metadata


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_encode_matches_transformers(pair: tuple[Tokenizer, Any, dict[str, Any]], text: str) -> None:
    ours, reference, _ = pair
    expected = reference.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False) == expected
    assert ours.encode(text) == [2, *expected]  # add_bos: llama.cpp's default for these vocabularies


@pytest.mark.parametrize("text", ALL_TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair: tuple[Tokenizer, Any, dict[str, Any]], text: str,
                                     skip_special_tokens: bool) -> None:
    ours, reference, _ = pair
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == reference.decode(
        ids, skip_special_tokens=skip_special_tokens
    )


def test_byte_fallback_and_round_trip(pair: tuple[Tokenizer, Any, dict[str, Any]]) -> None:
    ours, _, metadata = pair
    ids = ours.encode("한😀", add_special_tokens=False)
    tokens = metadata["tokenizer.ggml.tokens"]
    assert all(tokens[i].startswith("<0x") for i in ids if tokens[i] != "\u2581")
    # SentencePiece cannot keep a literal '▁', and with a dummy prefix it folds one leading blank into it.
    for text in [t for t in ALL_TEXTS if "\u2581" not in t and not t[:1].isspace()]:
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_special_and_user_defined_tokens(pair: tuple[Tokenizer, Any, dict[str, Any]]) -> None:
    ours, _, metadata = pair
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = ours.encode("<start_of_turn>x<think>\n\n<end_of_turn>", add_special_tokens=False)
    assert [tokens[i] for i in ids if tokens[i] in ("<start_of_turn>", "<think>", "\n\n", "<end_of_turn>")] == [
        "<start_of_turn>", "<think>", "\n\n", "<end_of_turn>"]
    assert ours.decode(ids) == "x<think>\n\n"  # '<think>' is user-defined: kept, unlike the control tokens
    assert ours.stop_token_ids == {1, tokens.index("<end_of_turn>")}
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.add_bos) == (2, 1, 0, True)


def test_gemma_merge_order_is_file_order() -> None:
    """Gemma ranks merges by file position, others by score: with scores that disagree, the ids differ."""
    gemma = _vocabulary("gemma3")
    llama = {**gemma, "general.architecture": "llama", "tokenizer.ggml.add_space_prefix": False}
    texts = [t for t in TEXTS if t.strip()]
    by_position, by_score = Tokenizer.from_gguf_metadata(gemma), Tokenizer.from_gguf_metadata(llama)
    assert [t for t in texts if by_position.encode(t) != by_score.encode(t)]


def test_explicit_flags_win() -> None:
    metadata = {**_vocabulary("llama"), "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_gguf_metadata(metadata)
    assert tok.add_bos is False
    assert tok.convert_ids_to_tokens(tok.encode("hi"))[0] != "\u2581"
    default = Tokenizer.from_gguf_metadata(_vocabulary("llama"))
    assert default.convert_ids_to_tokens(default.encode("hi", add_special_tokens=False))[0][0] == "\u2581"
