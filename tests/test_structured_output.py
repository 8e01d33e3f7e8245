"""Structured output and the token rules (logit_bias, min_tokens, bad_words, allowed_token_ids) on the default
model through the offline LLM: sampled outputs match their JSON schema, regex or choice; bans hold; a bad
constraint fails at submission, naming the field; greedy requests give the same tokens with ngram speculation on."""
from __future__ import annotations

import json
import re

import pytest

from tokenmill import LLM
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "score": {"type": "number", "minimum": -1, "maximum": 1},
                                      "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["color", "score", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                 "y": {"type": "integer"}},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
]
PROMPT = "Reply with a JSON object describing a person:"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32")


def _text(llm: LLM, params: SamplingParams, prompt: str = PROMPT) -> str:
    return llm.generate(prompt, params)[0].outputs[0].text


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "bounded-array", "enum-range-nullable", "nested"])
def test_sampled_json_matches_its_schema(llm, schema):
    for seed in range(3):
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=120,
                                structured_outputs=StructuredOutputsParams(json=schema))
        out = llm.generate(PROMPT, params)[0].outputs[0]
        assert out.finish_reason == "stop", out.text  # the grammar closed the object, not max_tokens
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_regex_and_choice(llm):
    text = _text(llm, SamplingParams(temperature=0.8, seed=1, max_tokens=60,
                                     structured_outputs=StructuredOutputsParams(json_object=True)))
    assert isinstance(json.loads(text), dict)
    pattern = r"[A-Z][a-z]{2,6}-\d{3}"
    for seed in range(3):
        text = _text(llm, SamplingParams(temperature=1.0, seed=seed, max_tokens=20,
                                         structured_outputs=StructuredOutputsParams(regex=pattern)))
        assert re.fullmatch(pattern, text), text
    choices = ["positive", "negative", "neutral"]
    text = _text(llm, SamplingParams(temperature=0.8, seed=2, structured_outputs=StructuredOutputsParams(
        choice=choices)), "The sentiment of 'I love it' is")
    assert text in choices


def test_n_sequences_each_follow_the_grammar(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS[0]))
    for out in llm.generate(PROMPT, params)[0].outputs:
        jsonschema.validate(json.loads(out.text), SCHEMAS[0])


@pytest.mark.parametrize("spec", [{"json": {"type": "integer", "minimum": 5, "maximum": 2}}, {"regex": "a(b"},
                                  {"grammar": "start: undefined_rule"}])
def test_bad_constraint_fails_at_submission(llm, spec):
    with pytest.raises(ValueError, match="^structured_outputs"):
        llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))


def test_one_constraint_at_a_time():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")


def test_logit_bias_bans_and_forces(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids
    banned = {t: -100.0 for t in greedy}
    again = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, logit_bias=banned))[0].outputs[0]
    assert not set(again.token_ids) & set(greedy)
    sampled = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=12,
                                                  logit_bias={1234: 100.0}))[0].outputs[0]
    assert sampled.token_ids == [1234] * 12


def test_min_tokens_bad_words_and_allowed_ids(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    first = greedy.token_ids[0]
    held = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, min_tokens=4,
                                               stop_token_ids=[first]))[0].outputs[0]
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]
    tokenizer = llm.get_tokenizer()
    token = next(t for t in greedy.token_ids if tokenizer.decode([t]).strip().isalpha())  # a whole word
    without = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, bad_words=[tokenizer.decode([token])])
                           )[0].outputs[0]
    assert token not in without.token_ids and without.token_ids != greedy.token_ids
    allowed = [10, 20, 30]
    only = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=8,
                                               allowed_token_ids=allowed))[0].outputs[0]
    assert set(only.token_ids) <= set(allowed)


def test_token_ids_out_of_range_name_the_field(llm):
    with pytest.raises(ValueError, match="^logit_bias"):
        llm.generate(PROMPT, SamplingParams(logit_bias={10**7: 1.0}))


def test_rules_and_grammar_equal_with_speculation():
    """Greedy tokens with bans, bias and a grammar: the same with ngram speculation as without."""
    params = SamplingParams(temperature=0, max_tokens=40, logit_bias={13: -100.0}, min_tokens=5,
                            bad_words=["the"])
    constrained = SamplingParams(temperature=0, max_tokens=80,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMAS[1]))
    prompt = "one two three one two three one two three one two"
    plain = LLM(dtype="float32")
    spec = LLM(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                    "mode": "always"})
    for p in (params, constrained):
        assert (spec.generate(prompt, p)[0].outputs[0].token_ids == plain.generate(prompt, p)[0].outputs[0].token_ids)
