"""GGUF byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`): GPT-2, StarCoder/SmolLM, Llama 3, Qwen2.

Text is cut into words by the regex llama.cpp picks from `tokenizer.ggml.pre`, each word is spelled in GPT-2's
byte alphabet, and the file's merges run inside each word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from tokenmill.errors import UnsupportedModelError
from tokenmill.model.tokenizer.gguf_vocab import CONTROL, USER_DEFINED, required

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _WordSplit:
    """How a byte-level vocabulary cuts text into words before BPE, per llama.cpp's `tokenizer.ggml.pre`.

    `regex` None means GPT-2's own split, which the ByteLevel pre-tokenizer applies itself.
    `add_bos` is llama.cpp's default when the file has no `tokenizer.ggml.add_bos_token`.
    """

    regex: str | None = None
    isolate_digits: bool = False
    ignore_merges: bool = False
    add_bos: bool = False

    def pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
        steps: list[pre_tokenizers.PreTokenizer] = []
        if self.isolate_digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        if self.regex is not None:
            steps.append(pre_tokenizers.Split(Regex(self.regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.regex is None))
        return pre_tokenizers.Sequence(steps)


_GPT2 = _WordSplit()
# StarCoder-style: every digit is its own word, then GPT-2's split (SmolLM's tokenizer.json says the same).
_STARCODER = _WordSplit(isolate_digits=True)
_LLAMA3 = _WordSplit(regex=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)

# The `tokenizer.ggml.pre` values whose split we reproduce, grouped as llama.cpp's llama-vocab.cpp groups them.
# A file without the key predates llama.cpp recording it; transformers splits those like GPT-2, and so do we.
_WORD_SPLITS: dict[str | None, _WordSplit] = {
    None: _GPT2,
    "default": _GPT2,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), _STARCODER
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _WordSplit(regex=_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _WordSplit(regex=_QWEN2_SPLIT)),
}


def byte_level_bpe(metadata: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, bool]:
    """The backend for a 'gpt2' vocabulary, and llama.cpp's add-BOS default for its pre-tokenizer."""
    split = _word_split(metadata.get("tokenizer.ggml.pre"))
    tokens: Sequence[str] = required(metadata, "tokenizer.ggml.tokens")
    merges: Sequence[str] = required(metadata, "tokenizer.ggml.merges")
    token_types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or []
    control = [tokens[index] for index, kind in enumerate(token_types) if kind == CONTROL]
    user_defined = [tokens[index] for index, kind in enumerate(token_types) if kind == USER_DEFINED]
    # Added tokens are matched in raw text, so they keep the file's spelling; everything else is byte-level.
    added = {*control, *user_defined}
    vocab = {token if token in added else _byte_level_spelling(token): index for index, token in enumerate(tokens)}
    model = BPE(
        vocab=vocab,
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        ignore_merges=split.ignore_merges,
    )
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = split.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
    return backend, split.add_bos


def _word_split(pre: str | None) -> _WordSplit:
    try:
        return _WORD_SPLITS[pre]
    except KeyError:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: "
            f"{sorted(name for name in _WORD_SPLITS if name)}"
        ) from None


def _byte_level_spelling(token: str) -> str:
    """The token in GPT-2's byte alphabet; the few files that store a token as raw text get it respelled."""
    if _BYTE_ALPHABET.issuperset(token):
        return token
    return "".join(_BYTE_CHARS[byte] for byte in token.encode("utf-8"))


def _gpt2_byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte 0..255: itself if printable, else the next char from U+0100 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))
    return tuple(chr(byte) if byte in printable else chr(next(stand_ins)) for byte in range(256))


_BYTE_CHARS = _gpt2_byte_chars()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS)
