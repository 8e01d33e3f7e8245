"""Tool calls through the chat API.

`tool_choice` "required" or a named function constrains the output to the functions' JSON schemas (structured
output, as vLLM does it: one code path for every model, no model-specific call format to parse): a named call
generates its arguments object; "required" generates a list of {"name", "parameters"} objects (one at most
without `parallel_tool_calls`). The output then becomes the message's `tool_calls`. "none" shows the tools to the
model and calls nothing. The template renders the tools (Qwen2.5's has a place for them).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import ChatCompletionRequest, FunctionCall, Tool, ToolCall

_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolChoice:
    """What the output is: a named function's arguments (`name` set) or a list of calls (`name` None)."""

    name: str | None
    schema: dict

    def calls(self, text: str) -> list[ToolCall]:
        """The tool calls the constrained output spells."""
        value = json.loads(text)
        pairs = [(self.name, value)] if self.name is not None else [(c["name"], c["parameters"]) for c in value]
        return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=json.dumps(
            arguments, ensure_ascii=False))) for name, arguments in pairs]


def tool_choice(body: ChatCompletionRequest) -> ToolChoice | None:
    """The constraint the request's tools and tool_choice ask for; None when the model answers in text."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice != "none":
        raise RequestError("tool_choice needs tools", "tool_choice")
    if not body.tools or choice in (None, "none"):
        if body.tools and choice is None:
            raise RequestError('tool_choice "auto" (the default with tools) is not supported yet: send "required", '
                               'a named function ({"type": "function", "function": {"name": ...}}) or "none"',
                               "tool_choice")
        return None
    if choice == "auto":
        raise RequestError('tool_choice "auto" is not supported yet: send "required", a named function or "none"',
                           "tool_choice")
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
