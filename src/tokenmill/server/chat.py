"""POST /v1/chat/completions: messages -> the model's chat template -> one prompt -> chat.completion responses."""
from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.errors import ChatTemplateError
from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.server.formatting import token_logprobs
from tokenmill.server.generation import ChoiceDelta, Generation, Prompt
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.params import FieldNames, check_max_tokens, to_sampling_params
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    Delta,
    DeltaToolCall,
    TopLogprob,
    Usage,
)
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import respond
from tokenmill.server.tools import ToolChoice, tool_choice


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    names = FieldNames(prompt="messages", max_tokens=max_param, logprobs="top_logprobs")
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = to_sampling_params(body, max_tokens=max_tokens, logprobs=num_logprobs, names=names,
                                limits=state.limits)
    tools = tool_choice(body, state.tokenizer.chat_template, state.limits.auto_tool_choice)
    if tools is not None and tools.schema is not None:
        if params.structured_outputs is not None:
            raise RequestError("a tool_choice that calls tools already constrains the output: drop "
                               "response_format (or the guided field)", "tool_choice")
        params.structured_outputs = StructuredOutputsParams(json=tools.schema)
        names.rename("structured_outputs", "tools")
    prompt = render_messages(body.messages, state, body.add_generation_prompt,
                             [t.model_dump(exclude_none=True) for t in body.tools or []], body.continue_final_message,
                             body.chat_template_kwargs)
    check_max_tokens(max_tokens, len(prompt.ids), state.max_model_len, max_param, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(state, request_id, [prompt], params, body.priority, names, body.user)
    last = body.messages[-1]
    echo = last.text if body.echo and last.role == "assistant" else ""
    formatter = ChatFormatter(request_id, state.served_model_name, params.n, num_logprobs, tools, echo)
    return await respond(request, generation, formatter, body.stream, body.include_usage(), body)


def render_messages(messages: list[ChatMessage], state: ServerState, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final_message: bool = False,
                    chat_template_kwargs: dict | None = None) -> Prompt:
    """The conversation (and the tools it may call) as the model was tuned to see it; the template writes its own
    BOS. A template's refusal (or a misuse of the options) is a 400 naming the field at fault."""
    try:
        # OpenAI's `developer` role is the system prompt under its newer name; templates know only `system`
        text = state.tokenizer.apply_chat_template([{**m.model_dump(exclude_none=True), "role": "system"}
                                                    if m.role == "developer" else m.model_dump(exclude_none=True)
                                                    for m in messages],
                                                   add_generation_prompt=add_generation_prompt, tools=tools,
                                                   continue_final_message=continue_final_message,
                                                   chat_template_kwargs=chat_template_kwargs)
    except ChatTemplateError as exc:
        raise RequestError(str(exc), exc.field) from None
    return Prompt(state.tokenizer.encode(text, add_special_tokens=False), text)


class ChatFormatter:
    def __init__(self, request_id: str, model: str, n: int, num_logprobs: int | None,
                 tools: ToolChoice | None = None, echo: str = "") -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.num_logprobs = num_logprobs
        self.tools = tools
        self.echo = echo  # chat echo: the last (assistant) message's content, which each choice starts with
        self._text: dict[int, str] = {}  # with tools: each choice's output so far, and how much went out as content
        self._sent: dict[int, int] = {}

    def stream_start(self) -> list[ChatCompletionChunk]:
        """OpenAI opens each choice with a chunk carrying only the role (and with echo, the echoed content)."""
        role = Delta(role="assistant", content=self.echo)
        return [self._wrap([ChatChunkChoice(index=i, delta=role)]) for i in range(self.n)]

    def chunk(self, delta: ChoiceDelta) -> ChatCompletionChunk:
        message, finish_reason = Delta(content=delta.text or None), delta.finish_reason
        if self.tools is not None:
            message, finish_reason = self._tool_delta(delta)
        choice = ChatChunkChoice(index=delta.index, delta=message,
                                 logprobs=self._logprobs(delta.token_ids, delta.logprobs),
                                 finish_reason=finish_reason, stop_reason=delta.stop_reason)
        return self._wrap([choice])

    def _tool_delta(self, delta: ChoiceDelta) -> tuple[Delta, str | None]:
        """Content as soon as it is surely not a call; the calls in one delta at the end of the choice."""
        text = self._text[delta.index] = self._text.get(delta.index, "") + delta.text
        sent = self._sent.get(delta.index, 0)
        if delta.finish_reason is None:
            ready = self.tools.streamable(text)
            self._sent[delta.index] = len(ready)
            return Delta(content=ready[sent:] or None), None
        content, calls = self.tools.parse(text) if delta.finish_reason == "stop" else (text, [])
        if not calls:  # cut short, or an auto answer in words: the rest as content
            return Delta(content=text[sent:] or None), delta.finish_reason
        rest = content[sent:] if content and content.startswith(text[:sent]) else None
        return Delta(content=rest or None, tool_calls=[DeltaToolCall(index=i, **c.model_dump())
                                                       for i, c in enumerate(calls)]), "tool_calls"

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._wrap([], usage)

    def response(self, outputs: list[RequestOutput], usage: Usage) -> ChatCompletionResponse:
        choices = []
        for c in outputs[0].outputs:
            message, finish_reason = AssistantMessage(content=c.text), c.finish_reason
            content, calls = self.tools.parse(c.text) if self.tools is not None and finish_reason == "stop" else (
                c.text, [])
            if calls:
                message, finish_reason = AssistantMessage(content=content, tool_calls=calls), "tool_calls"
            if self.echo:
                message.content = self.echo + (message.content or "")
            choices.append(ChatChoice(index=c.index, message=message, finish_reason=finish_reason,
                                      stop_reason=c.stop_reason, logprobs=self._logprobs(c.token_ids, c.logprobs)))
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)

    def _wrap(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def _logprobs(self, token_ids: list[int], entries: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        if self.num_logprobs is None or entries is None:
            return None
        content = [ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                                    top_logprobs=[TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))
                                                  for tok, lp in t.top])
                   for t in token_logprobs(token_ids, entries, self.num_logprobs)]
        return ChatLogprobs(content=content)
