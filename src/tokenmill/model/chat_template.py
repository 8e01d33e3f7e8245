"""Render a model's Jinja2 chat template exactly as transformers does, so prompts match what the model was tuned on."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import ChatTemplateError

Message = Mapping[str, Any]


def render_chat_template(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for `messages` (and `tools`, OpenAI's function definitions, for templates that show them);
    special tokens left as None stay undefined, as transformers leaves them. continue_final_message: the text ends
    inside the last message (no end-of-turn after it), so the model goes on writing it, as transformers and vLLM
    take the flag. template_kwargs: more variables for the template (vLLM's chat_template_kwargs, e.g. a
    template's own switches)."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message continues the last message: add_generation_prompt, which "
                                "opens a new one, must be false with it", "continue_final_message")
    reserved = {"messages", "tools", "add_generation_prompt"} & set(template_kwargs or ())
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {sorted(reserved)}: the request sets them",
                                "chat_template_kwargs")
    if not template:
        raise ChatTemplateError(
            "this model has no chat template; pass a raw prompt instead, or use a model whose "
            "tokenizer_config.json / GGUF metadata carries one"
        )
    variables: dict[str, Any] = {
        **(template_kwargs or {}),
        "messages": [_prepare_message(message) for message in messages],
        "add_generation_prompt": add_generation_prompt,
    }
    if tools:
        variables["tools"] = list(tools)
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    variables.update({name: token for name, token in specials.items() if token is not None})
    try:
        text = _compile(template).render(**variables)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed to render: {error}") from error
    return _open_final_message(text, variables["messages"][-1]) if continue_final_message else text


def _open_final_message(text: str, final: Mapping[str, Any]) -> str:
    """`text` cut right after the last message's content, dropping what the template closes its turn with. The
    content is found from the end; templates that strip it are matched on the stripped text."""
    content = final.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ChatTemplateError("continue_final_message needs a last message with text content to continue",
                                "continue_final_message")
    at = text.rfind(content.strip())
    if at < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not show the last message's "
                                "content as it is", "continue_final_message")
    kept = content.lstrip()
    return text[:at + len(kept)] if text.startswith(kept, at) else text[:at + len(content.strip())]


def _prepare_message(message: Message) -> dict[str, Any]:
    """A plain-dict copy with None fields dropped (templates test for missing keys, not None), except an assistant's
    null content beside its tool_calls, and text parts joined."""
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"each chat message must be a dict with 'role' and 'content', got {message!r}")
    prepared = {key: value for key, value in message.items() if value is not None}
    if "tool_calls" in prepared:
        prepared.setdefault("content", "")  # a turn that only called tools: templates that print content print ""
    if isinstance(prepared.get("content"), list):
        prepared["content"] = _join_text_parts(prepared["content"])
    return prepared


def _join_text_parts(parts: list[Any]) -> str:
    """OpenAI-style content parts as one string, newline-separated as llama.cpp and vLLM join them."""
    texts = []
    for part in parts:
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ChatTemplateError(f"only text content parts are supported, got {part!r}")
        texts.append(part["text"])
    return "\n".join(texts)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template text; servers render the same template for every request."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as error:
        message = f"the chat template is not valid Jinja2 (line {error.lineno}): {error.message}"
        raise ChatTemplateError(message) from error


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox, filters and globals transformers gives templates (they come from untrusted model files)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _raise_exception(message: str) -> None:
    """Lets a template reject a conversation (e.g. roles that do not alternate) with its own message."""
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's tojson: plain json.dumps, without Jinja's HTML escaping, keeping non-ASCII as is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """Templates such as Llama 3.1's stamp today's date into the system prompt."""
    return datetime.now().strftime(format)
