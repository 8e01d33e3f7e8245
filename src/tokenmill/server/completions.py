"""POST /v1/completions: prompts (text, token ids, or lists of either) -> text_completion responses."""
from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.server.formatting import token_logprobs
from tokenmill.server.generation import ChoiceDelta, Generation, Prompt
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.params import FieldNames, check_max_tokens, to_sampling_params
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import respond


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    if body.echo and body.logprobs is not None:
        raise RequestError("echo with logprobs needs prompt logprobs, which tokenmill does not compute; "
                           "drop one of the two", "logprobs")
    if body.stream and body.best_of is not None and body.best_of > body.n:
        raise RequestError("best_of > n cannot be streamed: the best are known only at the end", "best_of")
    names = FieldNames()
    params = to_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs, names=names,
                                limits=state.limits)
    prompts = _prompts(body.prompt, state) if not body.suffix else _fill_in_the_middle(body.prompt, body.suffix, state)
    for prompt in prompts:
        check_max_tokens(body.max_tokens, len(prompt.ids), state.max_model_len, "max_tokens", "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(state, request_id, prompts, params, body.priority, names, body.user)
    echo = [p.text if p.text is not None else state.tokenizer.decode(p.ids, skip_special_tokens=False)
            for p in prompts] if body.echo else None
    formatter = CompletionFormatter(request_id, state.served_model_name, params.n, echo, body.logprobs)
    return await respond(request, generation, formatter, body.stream, body.include_usage())


def _fill_in_the_middle(prompt: str | list, suffix: str, state: ServerState) -> list[Prompt]:
    """Each text prompt as the prefix of a fill-in-the-middle prompt whose suffix is `suffix`."""
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not all(isinstance(t, str) for t in texts):
        raise RequestError("suffix needs text prompts, not token ids", "suffix")
    try:
        return [Prompt(state.tokenizer.fill_in_the_middle(t, suffix), t) for t in texts]
    except ValueError as exc:
        raise RequestError(str(exc), "suffix") from None


def _prompts(prompt: str | list[str] | list[int] | list[list[int]], state: ServerState) -> list[Prompt]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], int):
        return [Prompt(list(prompt))]
    if len(prompt) > state.limits.max_prompts:
        raise RequestError(f"prompt may hold at most {state.limits.max_prompts} prompts (the server's --max-prompts), "
                           f"got {len(prompt)}", "prompt")
    return [Prompt(state.tokenizer.encode(p), p) if isinstance(p, str) else Prompt(list(p)) for p in prompt]


class CompletionFormatter:
    def __init__(self, request_id: str, model: str, n: int, echo: list[str] | None, num_logprobs: int | None) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.echo = echo
        self.num_logprobs = num_logprobs
        self._text_offset: dict[int, int] = {}

    def stream_start(self) -> list[CompletionResponse]:
        if self.echo is None:
            return []
        choices = [CompletionChoice(index=p * self.n + i, text=text)
                   for p, text in enumerate(self.echo) for i in range(self.n)]
        return [self._wrap(choices)]

    def chunk(self, delta: ChoiceDelta) -> CompletionResponse:
        logprobs = self._logprobs(delta.index, delta.token_ids, delta.logprobs)
        return self._wrap([CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._wrap([], usage)

    def response(self, outputs: list[RequestOutput], usage: Usage) -> CompletionResponse:
        choices = []
        for p, out in enumerate(outputs):
            prefix = self.echo[p] if self.echo is not None else ""
            for c in out.outputs:
                index = p * self.n + c.index
                choices.append(CompletionChoice(index=index, text=prefix + c.text, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason,
                                                logprobs=self._logprobs(index, c.token_ids, c.logprobs)))
        return self._wrap(choices, usage)

    def _wrap(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)

    def _logprobs(self, index: int, token_ids: list[int],
                  entries: list[TokenLogprobs] | None) -> CompletionLogprobs | None:
        """OpenAI's parallel lists; top_logprobs holds the top N plus the chosen token (so up to N + 1)."""
        if self.num_logprobs is None or entries is None:
            return None
        out = CompletionLogprobs()
        offset = self._text_offset.get(index, 0)
        for t in token_logprobs(token_ids, entries, self.num_logprobs):
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append({t.token: t.logprob, **dict(t.top)})
            out.text_offset.append(offset)
            offset += len(t.token)
        self._text_offset[index] = offset
        return out
