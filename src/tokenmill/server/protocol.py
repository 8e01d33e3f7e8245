"""The OpenAI wire format (plus vLLM's extensions) as pydantic models: what requests may carry (responses.py: what
responses hold).

Requests keep unknown fields instead of rejecting them (`extra="allow"`), as vLLM does, so clients that send
newer OpenAI fields still work; the server logs which fields it ignored. Ranges are checked by SamplingParams,
not here, so each rule lives in one place; these models only fix the types.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.server.openai_errors import RequestError
from tokenmill.server.unsupported_fields import UNSUPPORTED

_INT64 = dict(ge=-(2**63), le=2**63 - 1)


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON may carry lone UTF-16 surrogates ("\\ud800", or raw bytes ED A0 80, which Python's JSON decoder
        lets through); no tokenizer or response can encode them, so they are a 400 naming the field here, before
        anything else reads the text. RequestError (not ValueError) so the error keeps the field's path."""
        if (path := _lone_surrogate_at(data, "")) is not None:
            raise RequestError(f"{path or 'the request body'} contains a lone UTF-16 surrogate, which is not valid "
                               "Unicode text", path or None)
        return data

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The path ("messages[0].content") of the first string holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            if _lone_surrogate_at(key, path) is not None:
                return path
            if (found := _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _lone_surrogate_at(item, f"{path}[{i}]")) is not None:
                return found
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


def _bounds(default: Any = None, **bounds: float) -> Any:
    """Bounds the OpenAPI document states; SamplingParams enforces them (one rule, one message naming the field)."""
    return Field(default, json_schema_extra=bounds)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # required: a json_schema response_format without one is a 400
    strict: bool | None = None  # llguidance always enforces the schema exactly


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class SamplingRequest(OpenAIRequest):
    """Fields completions and chat share; `to_sampling_params` turns them into SamplingParams."""

    model: str | None = None  # None: the served model, as vLLM allows
    n: int = _bounds(1, minimum=1)  # at most the server's --max-n
    temperature: float | None = _bounds(minimum=0)
    top_p: float | None = _bounds(exclusiveMinimum=0, maximum=1)
    top_k: int | None = _bounds(minimum=-1)
    min_p: float | None = _bounds(minimum=0, maximum=1)
    presence_penalty: float | None = _bounds(minimum=-2, maximum=2)
    frequency_penalty: float | None = _bounds(minimum=-2, maximum=2)
    repetition_penalty: float | None = _bounds(exclusiveMinimum=0)
    seed: Annotated[int, Field(**_INT64)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: `vllm bench serve --ignore-eos` relies on it
    priority: Annotated[int, Field(**_INT64)] = 0  # vLLM extension: lower runs first
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]
    # vLLM's extensions, as its SamplingParams names them
    min_tokens: int = _bounds(0, minimum=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @model_validator(mode="after")
    def _supported(self) -> SamplingRequest:
        """Fields OpenAI or vLLM define that this server does not implement: a 400 naming the field, never a 200
        that quietly does something else. (Fields nobody defines are let through and logged, as vLLM does.)"""
        extra = self.model_extra or {}
        for name, (unsupported, why) in UNSUPPORTED.items():
            if name in extra and unsupported(extra[name], self):
                raise RequestError(f"{name} is not supported by this server{why}", name)
        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise RequestError("guided_decoding_backend must be 'guidance' (llguidance, the one this server has) or "
                               f"'auto', got {self.guided_decoding_backend!r}", "guided_decoding_backend")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _bounds(16, minimum=0)  # OpenAI's and vLLM's default; null fills the context; 0 with echo
    echo: bool = False
    logprobs: int | None = _bounds(minimum=0, maximum=20)
    prompt_logprobs: int | None = _bounds(minimum=0, maximum=20)  # vLLM's: each prompt token's logprob and top N
    best_of: int | None = _bounds(minimum=1)  # the n most likely of best_of samples (not streamable)
    suffix: str | None = None  # fill-in-the-middle: the text after the completion

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_shape(cls, value: Any) -> Any:
        """One clear message instead of pydantic's four (one per union member)."""
        ok = isinstance(value, str) or (isinstance(value, list) and (
            all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value)
            or all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `name`, `tool_call_id`: passed on to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """One message naming the rule, instead of pydantic's one per union member."""
        parts_ok = isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value)
        if not (value is None or isinstance(value, str) or parts_ok):
            raise ValueError('must be a string or a list of text parts ({"type": "text", "text": "..."}); '
                             "other content types are not supported")
        return value

    @property
    def text(self) -> str:
        """The content as one string, parts joined by newlines as the chat template joins them."""
        return "\n".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it null)")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = _bounds(minimum=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = _bounds(minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = _bounds(minimum=0, maximum=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # vLLM's: the reply starts with the last message's content when that message is the assistant's
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # needs add_generation_prompt false; the model goes on with the last message
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(OpenAIRequest):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's own hidden size (no truncation)
    user: str | None = None


class TokenizeRequest(OpenAIRequest):
    """vLLM's /tokenize: either `prompt` (text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (templates add BOS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]
