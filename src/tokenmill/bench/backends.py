"""How each kind of server departs from OpenAI's streaming API, so one load generator can time them all.

Two things differ between the servers we benchmark:
- how to make a request generate exactly max_tokens (so every server does the same work): vLLM's
  `ignore_eos` extension, which tokenmill, vLLM and llama.cpp take; `transformers serve` rejects fields it
  does not know (HTTP 422), but takes a `generation_config` JSON whose `eos_token_id: -1` is its own
  "no end-of-sequence token" value, so nothing can stop a request early.
- how a stream ends: `data: [DONE]` (OpenAI, vLLM, tokenmill, llama.cpp), or, for `transformers serve`, a last
  chunk with finish_reason and usage, then the end of the body.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.bench import BenchError


@dataclass(frozen=True)
class Backend:
    name: str
    ignore_eos_fields: dict[str, Any] = field(default_factory=dict)  # body fields: generate all max_tokens
    ends_with_done: bool = True  # its streams end with `data: [DONE]`; else a clean end after usage is the end


BACKENDS = {
    "openai": Backend("openai", {"ignore_eos": True}),
    "transformers": Backend("transformers", {"generation_config": json.dumps({"eos_token_id": -1})},
                            ends_with_done=False),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BenchError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}") from None
