"""Request fields OpenAI or vLLM define that this server does not implement, and when a value would need them:
the request models (protocol.py) answer those with a 400 naming the field instead of ignoring them."""
from __future__ import annotations

from typing import Any


def _chat(request: Any) -> bool:
    return hasattr(request, "messages")


def _set(value: Any, _request: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {} and value != ""


# field -> (is this value one the server would have to ignore?, what to say)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "prompt_logprobs": (lambda value, request: _set(value, request) and _chat(request),
                        " for chat (completions only)"),
    "use_beam_search": (_set, ": sampling and greedy decoding only"),
    "logits_processors": (_set, ""),
    "truncate_prompt_tokens": (_set, ""),
    "guided_whitespace_pattern": (_set, ""),
    "best_of": (lambda value, request: value is not None and value != request.n, " for chat (completions only)"),
    "functions": (_set, " (deprecated by OpenAI): send tools"),
    "function_call": (lambda value, _: value not in (None, "none"), " (deprecated by OpenAI): send tool_choice"),
    "chat_template": (_set, " per request; start the server with another template"),
    "documents": (_set, ""),
    "modalities": (lambda value, _: value not in (None, ["text"]), ": text only"),
    "audio": (_set, ": text only"),
    "prediction": (_set, ""),
    "reasoning_effort": (_set, ""),
    "web_search_options": (_set, ""),
}
