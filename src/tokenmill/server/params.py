"""Request fields -> SamplingParams, shared by completions and chat.

SamplingParams validates ranges and names the field first in its message; this module only maps that name
back to what the client sent (e.g. chat's `top_logprobs` is SamplingParams' `logprobs`), so every 400 names
a field of the request.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import SamplingRequest

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI allows 20 too
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "ignore_eos", "min_tokens", "stop_token_ids",
                    "include_stop_str_in_output", "skip_special_tokens", "bad_words", "allowed_token_ids", "best_of",
                    "prompt_logprobs")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, checked before anything is allocated for it (`serve` flags set the first two).
    Stop strings are matched by one automaton whatever their number, but each costs memory per sequence."""

    max_n: int = 128  # OpenAI's own cap on n
    auto_tool_choice: bool = False  # tool_choice "auto" (--enable-auto-tool-choice, as vLLM asks for it)
    max_prompts: int = 256  # prompts in one completions request
    max_stop: int = 128
    max_stop_chars: int = 512

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class FieldNames:
    """Which request field carries each SamplingParams / engine field, for error messages."""

    _KNOWN = (*_SAMPLING_FIELDS, "stop", "max_tokens", "logprobs", "prompt", "logit_bias", "structured_outputs")

    def __init__(self, **renames: str) -> None:
        self._renames = renames

    def rename(self, field: str, request_field: str) -> None:
        self._renames[field] = request_field

    def __getitem__(self, field: str) -> str:
        return self._renames.get(field, field)

    def error(self, exc: ValueError) -> RequestError:
        """SamplingParams and the engine start their messages with the field's name ("temperature must be ..."):
        the message and `param` name the request's own field (chat's "max_completion_tokens must be ...")."""
        first, _, rest = str(exc).partition(" ")
        if first not in self._KNOWN:
            return RequestError(str(exc), None)
        return RequestError(f"{self[first]} {rest}", self[first])


def to_sampling_params(request: SamplingRequest, *, max_tokens: int | None, logprobs: int | None,
                       names: FieldNames, limits: RequestLimits) -> SamplingParams:
    """`max_tokens` None fills the context; `logprobs` is the number of alternatives per token (None: off)."""
    if request.n > limits.max_n:
        raise RequestError(f"n must be <= {limits.max_n} (the server's --max-n), got {request.n}", "n")
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise RequestError(f"{names['logprobs']} must be <= {MAX_LOGPROBS}, got {logprobs}", names["logprobs"])
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    given = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name, None) is not None}
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stop) > limits.max_stop:
        raise RequestError(f"stop may hold at most {limits.max_stop} strings, got {len(stop)}", "stop")
    if too_long := [i for i, s in enumerate(stop) if len(s) > limits.max_stop_chars]:
        raise RequestError(f"stop strings may be at most {limits.max_stop_chars} characters long; stop[{too_long[0]}] "
                           f"has {len(stop[too_long[0]])}", "stop")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, stop=stop, logit_bias=_logit_bias(request),
                              structured_outputs=_structured_outputs(request, names), **given)
    except ValueError as exc:
        raise names.error(exc) from None


def _logit_bias(request: SamplingRequest) -> dict[int, float] | None:
    if request.logit_bias is None:
        return None
    try:
        return {int(token): bias for token, bias in request.logit_bias.items()}
    except ValueError:
        raise RequestError("logit_bias keys must be token ids (integers, as strings in JSON), got "
                           f"{sorted(request.logit_bias)[:5]}", "logit_bias") from None


def _structured_outputs(request: SamplingRequest, names: FieldNames) -> StructuredOutputsParams | None:
    """The one output constraint the request asks for, under whichever name; `names` learns which field it came
    from, so a schema llguidance rejects is a 400 naming that field."""
    asked: dict[str, dict] = {}
    if request.response_format is not None and request.response_format.type != "text":
        fmt = request.response_format
        asked["response_format"] = ({"json_object": True} if fmt.type == "json_object"
                                    else {"json": fmt.json_schema.schema_})
    if request.structured_outputs is not None:
        asked["structured_outputs"] = request.structured_outputs
    for field, kind in _GUIDED.items():
        if getattr(request, field) is not None:
            asked[field] = {kind: getattr(request, field)}
    if not asked:
        return None
    if len(asked) > 1:
        raise RequestError(f"give one output constraint, not {len(asked)}: {', '.join(asked)}", list(asked)[1])
    (field, spec), = asked.items()
    names.rename("structured_outputs", field)
    try:
        return StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"{field}: {exc}", field) from None


def check_max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, param: str,
                     prompt_param: str) -> None:
    """As vLLM and OpenAI: asking for more tokens than fit after the prompt is an error, not a silent cap; a
    prompt that alone fills the context is the prompt's fault, whatever max_tokens says."""
    if prompt_len >= max_model_len:
        raise RequestError(f"{prompt_param} has {prompt_len} tokens, but max_model_len is {max_model_len}: at least "
                           "one token must fit after it", prompt_param)
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise RequestError(
            f"{param} is too large: {max_tokens}. This model's maximum context length is {max_model_len} tokens "
            f"and your request has {prompt_len} input tokens ({max_tokens} > {max_model_len} - {prompt_len})", param)
