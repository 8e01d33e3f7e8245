"""What every GGUF vocabulary kind shares: llama.cpp's token types and the metadata keys it must have."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.errors import ModelLoadError

# llama.cpp's token types (gguf.TokenType) that need handling beyond the vocabulary itself.
CONTROL = 3  # special tokens such as <|im_end|>: matched whole in text, dropped by decode(skip_special_tokens)
USER_DEFINED = 4  # added tokens such as <think>: matched whole in text, kept by decode


def required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ModelLoadError(f"the GGUF tokenizer is incomplete: key {key!r} is missing")
    return metadata[key]
