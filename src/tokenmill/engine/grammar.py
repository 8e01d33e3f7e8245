"""A request's constraint (JSON schema, any JSON object, regex, choice, grammar) as llguidance's grammar, validated
and cached. The API process compiles it to refuse a bad one with a 400 before the engine sees it, so this module
imports no torch (structured_output.py, in the engine, holds the matchers)."""
from __future__ import annotations

import functools
import json

import llguidance

from tokenmill.sampling_params import StructuredOutputsParams


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for `spec`, validated; a ValueError starting "structured_outputs" says what is wrong."""
    key = json.dumps({k: v for k, v in vars(spec).items() if v not in (None, False)}, sort_keys=True)
    return _compiled(key)


@functools.lru_cache(maxsize=256)
def _compiled(key: str) -> str:
    (kind, value), = json.loads(key).items()
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(value if isinstance(value, str)
                                                                    else json.dumps(value))
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", json.dumps(value))
        else:
            grammar = llguidance.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
    except (ValueError, TypeError) as exc:
        raise ValueError(f"structured_outputs {kind} is not valid: {exc}") from None
    if error := llguidance.LLMatcher.validate_grammar(grammar):
        raise ValueError(f"structured_outputs {kind} is not valid: {error}")
    return grammar
