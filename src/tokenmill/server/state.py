"""What every route needs about one served model: its engine, tokenizer, names and metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.params import RequestLimits

if TYPE_CHECKING:  # the cache's replays are shaped by generation.py, which imports this module
    from tokenmill.server.result_cache import ResultCache


@dataclass
class ServerState:
    async_engine: AsyncEngine
    served_model_name: str
    model_root: str  # the checkpoint path, shown as `root` in /v1/models
    metrics: ServerMetrics
    accepted_model_names: frozenset[str] = field(default_factory=frozenset)  # besides served_model_name
    log_prompts: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)
    result_cache: ResultCache | None = None  # shared by the server's models; None: every request runs
    identity: dict[str, Any] = field(default_factory=dict)  # the engine settings its outputs depend on

    @classmethod
    def create(cls, async_engine: AsyncEngine, served_model_name: str, *, model_root: str = "",
               accepted_model_names: frozenset[str] = frozenset(), log_prompts: bool = False,
               limits: RequestLimits | None = None, result_cache: ResultCache | None = None,
               identity: dict[str, Any] | None = None) -> ServerState:
        return cls(async_engine, served_model_name, model_root or served_model_name,
                   ServerMetrics(async_engine, served_model_name), accepted_model_names, log_prompts,
                   limits or RequestLimits(), result_cache, identity or {})

    @property
    def tokenizer(self) -> Tokenizer:
        return self.async_engine.input_processor.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.async_engine.input_processor.max_model_len
