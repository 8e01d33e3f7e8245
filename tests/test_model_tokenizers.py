"""The packaged Gemma 3 and Qwen2.5-Coder vocabularies against transformers' tokenizers loaded from the same GGUFs,
and both models' chat templates rendered against transformers' renderer.

The tokenizer comparisons are slow (transformers takes about a minute to build each reference) and need the
optional packages (pip install 'tokenmill[models]'); the template checks are fast. The Gemma 3 270M GGUF is the base
model and carries no chat template, so Gemma 3's published instruct template is checked from the text below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokenizer_texts import CONVERSATIONS, DIGITS_AFTER_WHITESPACE, SENTENCEPIECE_TEXTS, TEXTS
from tokenmill.errors import ChatTemplateError
from tokenmill.model.chat_template import render_chat_template
from tokenmill.model.loader import load_tokenizer, resolve_model_path
from tokenmill.model.loader.catalog import packaged_model
from tokenmill.model.loader.gguf_header import read_gguf_header
from tokenmill.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ALL_TEXTS = TEXTS + DIGITS_AFTER_WHITESPACE + SENTENCEPIECE_TEXTS

# google/gemma-3-*-it's chat template (tokenizer_config.json), as published.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18°C, sunny"},
    {"role": "tool", "content": "wind 5 km/h"},
]

SPECIALS = {"gemma3-270m": ("<bos>", "<eos>"), "qwen2.5-coder-1.5b": ("<|endoftext|>", "<|im_end|>")}


def _installed_or_skip(name: str) -> None:
    model = packaged_model(name)
    assert model is not None
    if model.missing_distributions():
        pytest.skip(f"{name} is not installed ({model.install_command()}, or pip install 'tokenmill[models]')")


def _file_chat_template(name: str) -> str | None:
    """The template in the GGUF header, read from the first chunk: no join needed."""
    _installed_or_skip(name)
    first_chunk = packaged_model(name).part_paths()[0]
    return read_gguf_header(first_chunk).metadata.get("tokenizer.chat_template")


def _transformers_render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         bos_token: str, eos_token: str, continue_final_message: bool = False) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        bos_token=bos_token, eos_token=eos_token)
    return rendered[0]


# --- chat templates (fast) -------------------------------------------------------------------------------------


def _template(name: str) -> str:
    return GEMMA3_CHAT_TEMPLATE if name == "gemma3-270m" else _file_chat_template(name)


@pytest.mark.parametrize("name", list(SPECIALS))
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(name: str, messages: list[dict[str, Any]],
                                               add_generation_prompt: bool) -> None:
    template = _template(name)
    bos, eos = SPECIALS[name]
    expected = _transformers_render(template, messages, add_generation_prompt, bos, eos)
    assert render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=bos, eos_token=eos) == expected


def test_qwen_tool_calls_render_as_transformers() -> None:
    template = _file_chat_template("qwen2.5-coder-1.5b")
    expected = _transformers_render(template, TOOL_CONVERSATION, True, *SPECIALS["qwen2.5-coder-1.5b"])
    assert '"arguments": {"city": "Paris"}' in expected and "<tool_response>\n18°C, sunny" in expected
    bos, eos = SPECIALS["qwen2.5-coder-1.5b"]
    assert render_chat_template(template, TOOL_CONVERSATION, bos_token=bos, eos_token=eos) == expected


@pytest.mark.parametrize("name", list(SPECIALS))
@pytest.mark.parametrize("prefill", ["The answer is", "The answer is ", "  {\"a\": "])
def test_continue_final_message_renders_as_transformers(name: str, prefill: str) -> None:
    """The prompt ends inside the assistant's message (templates that trim it end at its trimmed text)."""
    template = _template(name)
    bos, eos = SPECIALS[name]
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": prefill}]
    expected = _transformers_render(template, messages, False, bos, eos, continue_final_message=True)
    text = render_chat_template(template, messages, add_generation_prompt=False, continue_final_message=True,
                                bos_token=bos, eos_token=eos)
    assert text == expected and text.rstrip().endswith(prefill.strip())
    with pytest.raises(ChatTemplateError, match="add_generation_prompt") as error:
        render_chat_template(template, messages, continue_final_message=True, bos_token=bos, eos_token=eos)
    assert error.value.field == "continue_final_message"


def test_chat_template_kwargs_reach_the_template() -> None:
    template = "{% for m in messages %}{{ m.content | upper if shout else m.content }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat_template(template, messages, template_kwargs={"shout": True}) == "HI"
    assert render_chat_template(template, messages, template_kwargs={"shout": False}) == "hi"
    with pytest.raises(ChatTemplateError, match="messages") as error:
        render_chat_template(template, messages, template_kwargs={"messages": []})
    assert error.value.field == "chat_template_kwargs"


def test_gemma3_template_rejects_non_alternating_roles() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat_template(GEMMA3_CHAT_TEMPLATE, messages, bos_token="<bos>")


def test_gemma3_base_gguf_has_no_chat_template() -> None:
    assert _file_chat_template("gemma3-270m") is None


# --- the vocabularies (slow) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(SPECIALS))
def pair(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, Any]:
    name = request.param
    _installed_or_skip(name)
    path: Path = resolve_model_path(name)  # joined into the cache once
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return name, load_tokenizer(name), reference


@pytest.mark.slow
def test_special_token_facts(pair: tuple[str, Tokenizer, Any]) -> None:
    name, ours, reference = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert ours.add_bos is (name == "gemma3-270m") is reference.add_bos_token
    assert ours.vocab_size == len(reference) == {"gemma3-270m": 262144, "qwen2.5-coder-1.5b": 151936}[name]
    assert ours.chat_template == reference.chat_template
    end_of_turn = {"gemma3-270m": ["<eos>", "<end_of_turn>"], "qwen2.5-coder-1.5b": ["<|endoftext|>", "<|im_end|>"]}
    assert ours.stop_token_ids == set(reference.convert_tokens_to_ids(end_of_turn[name]))


@pytest.mark.slow
def test_encode_decode_match_transformers(pair: tuple[str, Tokenizer, Any]) -> None:
    _, ours, reference = pair
    for text in ALL_TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
        assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text


@pytest.mark.slow
def test_known_ids(pair: tuple[str, Tokenizer, Any]) -> None:
    """Ids independent of transformers: BOS, then '▁world' / 'Ġworld' as the vocabulary file spells them."""
    name, ours, _ = pair
    ids = ours.encode("Hello world")
    tokens = ours.convert_ids_to_tokens(ids)
    assert tokens == (["<bos>", "Hello", "\u2581world"] if name == "gemma3-270m" else ["Hello", "Ġworld"])


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_ids_match_transformers(pair: tuple[str, Tokenizer, Any], messages: list[dict[str, Any]]) -> None:
    name, ours, reference = pair
    template = _template(name)
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
    text = render_chat_template(template, messages, bos_token=SPECIALS[name][0], eos_token=SPECIALS[name][1])
    assert ours.encode(text, add_special_tokens=False) == expected
    if ours.chat_template is not None:
        assert ours.apply_chat_template(messages, tokenize=True) == expected
