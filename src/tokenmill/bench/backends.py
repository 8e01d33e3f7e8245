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
from dataclasses import dataclass
from typing import Any

from tokenmill.bench import BenchError


@dataclass(frozen=True)
class Backend:
    name: str
    ends_with_done: bool = True  # its streams end with `data: [DONE]`; else a clean end after usage is the end

    def ignore_eos_fields(self, temperature: float) -> dict[str, Any]:
        """Body fields that make the server generate all max_tokens."""
        if self.name == "transformers":
            # a generation_config replaces the model's defaults, so it carries the sampling switch as well
            return {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": temperature > 0})}
        return {"ignore_eos": True}


BACKENDS = {"openai": Backend("openai"), "transformers": Backend("transformers", ends_with_done=False)}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BenchError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}") from None
