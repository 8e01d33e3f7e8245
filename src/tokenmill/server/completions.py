"""POST /v1/completions: prompts (text, token ids, or lists of either) -> text_completion responses."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.server.formatting import token_logprobs
from tokenmill.server.generation import ChoiceDelta, Generation, Prompt
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.params import FieldNames, check_max_tokens, to_sampling_params
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse, PromptLogprob, Usage
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import respond


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    if body.stream and body.best_of is not None and body.best_of > body.n:
        raise RequestError("best_of > n cannot be streamed: the best are known only at the end", "best_of")
    scoring = body.echo and body.logprobs is not None  # the prompt's tokens and logprobs lead the logprobs
    if scoring and body.stream:
        raise RequestError("echo with logprobs is not streamed: send stream: false", "stream")
    if body.max_tokens == 0 and not scoring:
        raise RequestError("max_tokens must be >= 1; 0 only with echo and logprobs (scoring the prompt)", "max_tokens")
    names = FieldNames()
    params = to_sampling_params(body, max_tokens=body.max_tokens or (1 if body.max_tokens == 0 else None),
                                logprobs=body.logprobs, names=names, limits=state.limits)
    if scoring:
        params.prompt_logprobs = max(params.prompt_logprobs or 0, body.logprobs)
    prompts = _prompts(body.prompt, state) if not body.suffix else _fill_in_the_middle(body.prompt, body.suffix, state)
    for prompt in prompts:
        check_max_tokens(body.max_tokens, len(prompt.ids), state.max_model_len, "max_tokens", "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(state, request_id, prompts, params, body.priority, names, body.user)
    echo = [p.text if p.text is not None else state.tokenizer.decode(p.ids, skip_special_tokens=False)
            for p in prompts] if body.echo else None
    formatter = CompletionFormatter(request_id, state.served_model_name, params.n, echo, body.logprobs,
                                    score_only=body.max_tokens == 0, prompt_logprobs=body.prompt_logprobs,
                                    decode=lambda t: state.tokenizer.decode([t], skip_special_tokens=False))
    return await respond(request, generation, formatter, body.stream, body.include_usage(), body)


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
    def __init__(self, request_id: str, model: str, n: int, echo: list[str] | None, num_logprobs: int | None,
                 score_only: bool = False, prompt_logprobs: int | None = None,
                 decode: Callable[[int], str] = str) -> None:
        """score_only: max_tokens 0 (the engine made one token, which is not returned); prompt_logprobs: vLLM's
        field, answered in its own shape; decode: a token's text (the first prompt token has no logprob entry)."""
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.echo = echo
        self.num_logprobs = num_logprobs
        self.score_only = score_only
        self.prompt_logprobs = prompt_logprobs
        self.decode = decode
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
        if self.score_only:
            usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
        for p, out in enumerate(outputs):
            prefix = self.echo[p] if self.echo is not None else ""
            for c in out.outputs:
                index = p * self.n + c.index
                text, ids, entries = ("", [], []) if self.score_only else (c.text, c.token_ids, c.logprobs or [])
                if self.echo is not None and self.num_logprobs is not None:
                    logprobs = self._scored_logprobs(index, out, ids, entries)
                else:
                    logprobs = self._logprobs(index, ids, entries)
                choices.append(CompletionChoice(
                    index=index, text=prefix + text, finish_reason="length" if self.score_only else c.finish_reason,
                    stop_reason=None if self.score_only else c.stop_reason, logprobs=logprobs,
                    prompt_logprobs=_vllm_prompt_logprobs(out) if self.prompt_logprobs is not None else None))
        return self._wrap(choices, usage)

    def _scored_logprobs(self, index: int, out: RequestOutput, ids: list[int],
                         entries: list[TokenLogprobs]) -> CompletionLogprobs:
        """echo + logprobs: the prompt's tokens first (the first with null: nothing predicts it), then the
        output's, as OpenAI's legacy completions (and lm-eval-harness, which scores text this way) have them."""
        first = self.decode(out.prompt_token_ids[0])
        self._text_offset[index] = len(first)
        rest = self._logprobs(index, out.prompt_token_ids[1:] + ids, out.prompt_logprobs[1:] + entries)
        return CompletionLogprobs(text_offset=[0, *rest.text_offset], token_logprobs=[None, *rest.token_logprobs],
                                  tokens=[first, *rest.tokens], top_logprobs=[None, *rest.top_logprobs])

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


def _vllm_prompt_logprobs(out: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's prompt_logprobs: per prompt token, token id (as text) -> its logprob, rank and text."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else {str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                              decoded_token=lp.decoded_token)
                                        for t, lp in entry.items()} for entry in out.prompt_logprobs]
