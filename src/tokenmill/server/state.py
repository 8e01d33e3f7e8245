"""What every route needs, built once per app: the engine, its tokenizer, the model's names, metrics."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import OpenAIRequest

logger = logging.getLogger("tokenmill.server")


@dataclass
class ServerState:
    async_engine: AsyncEngine
    served_model_name: str
    model_root: str  # the checkpoint path, shown as `root` in /v1/models
    metrics: ServerMetrics
    accepted_model_names: frozenset[str] = field(default_factory=frozenset)  # besides served_model_name
    log_prompts: bool = False

    @property
    def tokenizer(self) -> Tokenizer:
        return self.async_engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.async_engine.engine.max_model_len

    def check_request(self, request: OpenAIRequest, model: str | None) -> None:
        """404 for a model this server does not serve (as vLLM and OpenAI); warn about ignored fields."""
        if model is not None and model != self.served_model_name and model not in self.accepted_model_names:
            raise RequestError(f"The model `{model}` does not exist; this server serves `{self.served_model_name}`",
                               "model", status=404)
        if ignored := request.ignored_fields():
            logger.warning("ignoring request fields tokenmill does not support: %s", ", ".join(ignored))
