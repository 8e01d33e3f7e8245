"""Hermes-format tool calls ("auto"): parsing a finished output, and what part of an unfinished one may stream."""
from __future__ import annotations

import json

import pytest

from tokenmill.server.tools import ToolChoice

AUTO = ToolChoice(None, None, frozenset({"get_weather", "get_time"}))


def test_auto_reads_hermes_calls_and_keeps_the_words():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = AUTO.parse(text)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", ['{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                  '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'])
def test_auto_reads_a_bare_call_naming_a_tool(text):
    content, calls = AUTO.parse(text)
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("text", ["It is sunny.", "<tool_call>{not json}</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', '{"name": "other", "arguments": {}}',
                                  '```python\nprint(1)\n```'])
def test_auto_without_a_well_formed_call_is_content(text):
    assert AUTO.parse(text) == (text, [])


@pytest.mark.parametrize("text, ready", [("Hello", "Hello"), ("Hello <tool", "Hello "), ("Hi <", "Hi "),
                                         ("Hi <tool_call>{", "Hi "), ("a < b", "a < b"), (" {", ""), ("`", ""),
                                         ("```json\n{", ""), ("`x`", "`x`")])
def test_auto_streams_only_what_cannot_become_a_call(text, ready):
    assert AUTO.streamable(text) == ready


def test_constrained_choices_stream_nothing_and_parse_their_json():
    named = ToolChoice("f", {"type": "object"})
    assert named.streamable('{"x": 1') == ""
    assert [(c.function.name, c.function.arguments) for c in named.parse('{"x": 1}')[1]] == [("f", '{"x": 1}')]
    listed = ToolChoice(None, {"type": "array"})
    content, calls = listed.parse('[{"name": "g", "parameters": {}}]')
    assert content is None and [c.function.name for c in calls] == ["g"]
