"""Tool calls through the chat API.

`tool_choice` "required" or a named function constrains the output to the functions' JSON schemas (structured
output, as vLLM does it: one code path for every model, no model-specific call format to parse): a named call
generates its arguments object; "required" generates a list of {"name", "parameters"} objects (one at most
without `parallel_tool_calls`). "auto" (OpenAI's default with tools) lets the model choose, and reads its calls in
the Hermes format its chat template teaches it (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`: Qwen2.5
and most open tool-tuned models; vLLM's `hermes` parser), or an answer that is nothing but such a JSON call (small
models drop the tags, often fencing it as code instead); a template without that format cannot do "auto".
"none" shows the tools and calls nothing. The template renders the tools (Qwen2.5's has a place for them).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import ChatCompletionRequest, Tool
from tokenmill.server.responses import FunctionCall, ToolCall

_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.DOTALL)
_FENCED = re.compile(r"(?:```(?:json)?\s*)?(\{.*\})(?:\s*```)?", re.DOTALL)  # a bare call, maybe in a code fence


@dataclass(frozen=True)
class ToolChoice:
    """How the output turns into calls: a named function's arguments (`name`), a list of calls (`schema` without
    `name`), or the model's own choice in Hermes tags (`schema` None: "auto")."""

    name: str | None
    schema: dict | None
    names: frozenset[str] = frozenset()  # the tools' names: under "auto", a bare JSON call must name one

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; auto output without a well-formed call stays content."""
        if self.schema is None:
            bodies = _HERMES_CALL.findall(text)
            bare = not bodies and _FENCED.fullmatch(text.strip())
            try:  # small models often drop the tags: a whole answer that is one call (maybe fenced) counts too
                calls = [json.loads(body) for body in bodies or ([bare.group(1)] if bare else [])]
                pairs = [(c["name"], c.get("arguments", {})) for c in calls]
            except (ValueError, KeyError, TypeError):
                return text, []
            if not pairs or (bare and pairs[0][0] not in self.names):
                return text, []
            content = _HERMES_CALL.sub("", text).strip() if bodies else None  # a bare call is all there is
            return content or None, [_call(name, arguments) for name, arguments in pairs]
        value = json.loads(text)
        pairs = [(self.name, value)] if self.name is not None else [(c["name"], c["parameters"]) for c in value]
        return None, [_call(name, arguments) for name, arguments in pairs]

    def streamable(self, text: str) -> str:
        """The part of an unfinished output that is surely content, to stream now: under "auto", up to a call's
        opening tag (or a tail that may become one); otherwise nothing (the output is the calls)."""
        head = text.lstrip()
        if self.schema is not None or head.startswith("{") or "```".startswith(head[:3]):
            return ""  # (under "auto": a call without tags, or fenced, may be coming: held until the end)
        if (start := text.find(HERMES_OPEN)) >= 0:
            return text[:start]
        for keep in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if HERMES_OPEN.startswith(text[-keep:]):
                return text[:-keep]
        return text


def _call(name: str, arguments: object) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))


def tool_choice(body: ChatCompletionRequest, chat_template: str | None, auto: bool) -> ToolChoice | None:
    """What the request's tools and tool_choice ask for; None when the model answers in text only. auto: the
    server was started with --enable-auto-tool-choice."""
    choice = body.tool_choice
    if choice not in (None, "none") and not body.tools:
        raise RequestError("tool_choice needs tools", "tool_choice")
    if not body.tools or choice == "none":
        return None
    if choice in (None, "auto"):
        if not auto:
            raise RequestError('tool_choice "auto" (the default with tools) needs the server started with '
                               '--enable-auto-tool-choice (as vLLM), else send "required", a named function or '
                               '"none"', "tool_choice")
        if HERMES_OPEN not in (chat_template or ""):
            raise RequestError(f'tool_choice "auto" (the default with tools) reads the model\'s calls in its chat '
                               f"template's {HERMES_OPEN} format, which this model's template does not have: send "
                               '"required" or a named function', "tool_choice")
        return ToolChoice(None, None, frozenset(t.function.name for t in body.tools))
    tools = {t.function.name: t for t in body.tools}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(tool)},
                  "required": ["name", "parameters"], "additionalProperties": False} for name, tool in tools.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolChoice(None, schema)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice.get("type") != "function" or name not in tools:
        raise RequestError(f"tool_choice must name one of the tools ({', '.join(tools)}) as "
                           '{"type": "function", "function": {"name": ...}}, got ' + json.dumps(choice), "tool_choice")
    return ToolChoice(name, _parameters(tools[name]))


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or _NO_ARGUMENTS
