"""POST /v1/embeddings: each input's final hidden states, mean-pooled and L2-normalized (LLMEngine.embed), as
float lists or OpenAI's base64 of little-endian float32."""
from __future__ import annotations

import base64
import uuid

import numpy as np

from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import EmbeddingRequest
from tokenmill.server.responses import EmbeddingData, EmbeddingResponse, EmbeddingUsage
from tokenmill.server.state import ServerState


async def create_embeddings(body: EmbeddingRequest, state: ServerState) -> EmbeddingResponse:
    inputs = _inputs(body.input, state)
    hidden = state.async_engine.input_processor.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise RequestError(f"dimensions must be this model's {hidden} (embeddings are not truncated), got "
                           f"{body.dimensions}", "dimensions")
    data, tokens = [], 0
    for index, prompt in enumerate(inputs):
        try:
            vector = await state.async_engine.embed(f"embd-{uuid.uuid4().hex}", prompt)
        except ValueError as exc:
            raise RequestError(str(exc).replace("prompt", "input", 1), "input") from None
        tokens += len(prompt) if not isinstance(prompt, str) else len(state.tokenizer.encode(prompt))
        data.append(EmbeddingData(index=index, embedding=vector if body.encoding_format == "float" else
                                  base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()))
    return EmbeddingResponse(data=data, model=state.served_model_name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _inputs(value: str | list, state: ServerState) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise RequestError("input must not be empty", "input")
    if isinstance(value[0], int):
        return [list(value)]
    if len(value) > state.limits.max_prompts:
        raise RequestError(f"input may hold at most {state.limits.max_prompts} items (the server's --max-prompts), "
                           f"got {len(value)}", "input")
    return list(value)
