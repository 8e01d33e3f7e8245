"""GGUF SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`): Llama 2, Mistral, Gemma and kin.

SentencePiece BPE merges the adjacent pair whose joined piece scores best; that is plain BPE whose merge list is
every two-piece split of every piece, ranked by the joined piece. Spaces are spelled '▁', and a character with no
piece falls back to its UTF-8 bytes as '<0xNN>' tokens. Built the way transformers builds these files, so ids match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from tokenmill.model.tokenizer.gguf_vocab import CONTROL, USER_DEFINED, required

SPACE = "\u2581"
# Gemma files rank merges by the pieces' order in the file (their scores do not follow it), spell multi-space
# pieces with real spaces, and prepend no space to the text; transformers and llama.cpp treat them so too.
_GEMMA_FAMILY = frozenset({"gemma", "gemma2", "gemma3"})


def sentencepiece_bpe(metadata: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, bool]:
    """The backend for a 'llama' vocabulary, and llama.cpp's add-BOS default for it (yes)."""
    gemma = metadata.get("general.architecture") in _GEMMA_FAMILY
    tokens: Sequence[str] = required(metadata, "tokenizer.ggml.tokens")
    if gemma:
        tokens = [_respell_spaces(token) for token in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if gemma:
        ranks = {token: -index for index, token in enumerate(tokens)}
    else:
        ranks = dict(zip(tokens, required(metadata, "tokenizer.ggml.scores")))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = BPE(
        vocab=vocab,
        merges=_merges(vocab, ranks),
        dropout=None,
        fuse_unk=True,
        byte_fallback=True,
        unk_token=None if unk_id is None else tokens[unk_id],
    )
    backend = tokenizers.Tokenizer(model)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get("tokenizer.ggml.add_space_prefix", not gemma):
        # The text's first piece gets a leading '▁' (SentencePiece's dummy prefix); decode drops it again.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, metadata, vocab)
    return backend, True


def _respell_spaces(token: str) -> str:
    """Gemma stores its runs of spaces as real spaces; text reaches BPE with spaces already turned into '▁'."""
    return SPACE * len(token) if " " in token and not token.strip() else token


def _merges(vocab: Mapping[str, int], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two known pieces, best-ranked joined piece first, then longer left, longer right.

    The same list, in the same order (ties keep vocabulary order), as transformers' `generate_merges`.
    """
    found = [
        (rank, piece[:cut], piece[cut:])
        for piece, rank in ranks.items()
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    found.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _add_special_tokens(backend: tokenizers.Tokenizer, metadata: Mapping[str, Any], vocab: Mapping[str, int]) -> None:
    """Control tokens as special, user-defined ones (Gemma's newline runs, '<think>') as plain added tokens."""
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or []
    control = [tokens[index] for index, kind in enumerate(token_types) if kind == CONTROL]
    # A respelled space run is no longer in the vocabulary under its file spelling, so BPE reaches it instead.
    user_defined = [
        tokens[index] for index, kind in enumerate(token_types) if kind == USER_DEFINED and tokens[index] in vocab
    ]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
