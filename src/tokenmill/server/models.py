"""ModelRegistry: the models one server serves, each with its own engine (core process, KV budget) and metrics.

A request's `model` field picks one, by its served name or an alias (the checkpoint path, the name it was
loaded by); a request without `model` goes to the first. An alias two models share routes to neither, so a
name never picks a model by accident of order. With one model this is exactly the single-model server.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

from tokenmill.server.metrics import ServerMetrics, render_metrics
from tokenmill.server.openai_errors import RequestError
from tokenmill.server.protocol import OpenAIRequest
from tokenmill.server.state import ServerState

logger = logging.getLogger("tokenmill.server")
METRICS_PREFIXES = ("tokenmill", "vllm")


class ModelRegistry:
    def __init__(self, models: Sequence[ServerState], metrics_prefix: str = "tokenmill") -> None:
        """metrics_prefix: the metric names' prefix on /metrics, "tokenmill" or "vllm" (see render_metrics)."""
        if metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(f"--metrics-prefix must be one of {', '.join(METRICS_PREFIXES)}, got {metrics_prefix!r}")
        self.metrics_prefix = metrics_prefix
        if not models:
            raise ValueError("a server needs at least one model")
        names = [m.served_model_name for m in models]
        if repeated := sorted(name for name, count in Counter(names).items() if count > 1):
            raise ValueError(f"served model names must differ; {', '.join(repeated)} is given more than once "
                             "(set one --served-model-name per model)")
        self.models = list(models)
        aliases = Counter(alias for m in models for alias in m.accepted_model_names - set(names))
        self._by_name = {alias: m for m in models for alias in m.accepted_model_names if aliases[alias] == 1}
        self._by_name.update((m.served_model_name, m) for m in models)

    @property
    def default(self) -> ServerState:
        """The model that serves requests which name none."""
        return self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.served_model_name for m in self.models]

    def get(self, model: str | None) -> ServerState | None:
        return self.default if model is None else self._by_name.get(model)

    def route(self, request: OpenAIRequest, model: str | None) -> ServerState:
        """The model a request names: 404 for one this server does not serve (as vLLM and OpenAI), with the
        names it does; warns about request fields tokenmill ignores."""
        state = self.get(model)
        if state is None:
            raise RequestError(f"The model `{model}` does not exist. Available models: {', '.join(self.names)}",
                               "model", status=404)
        if ignored := request.ignored_fields():
            # repr: a field name is client text, and a newline in it must not start a forged log line
            logger.warning("ignoring request fields tokenmill does not support: %s", ", ".join(map(repr, ignored)))
        return state

    def health_problems(self) -> list[str]:
        """Why each model that cannot serve now cannot (dead, stopped or stuck engine core)."""
        return [f"model {m.served_model_name}: {problem}" for m in self.models
                if (problem := m.async_engine.health_problem()) is not None]

    def attach(self) -> None:
        """Start reading every engine's outputs on the running event loop (see AsyncEngine.attach)."""
        for m in self.models:
            m.async_engine.attach()

    @property
    def num_in_flight(self) -> int:
        return sum(m.async_engine.num_in_flight for m in self.models)

    async def drain(self, timeout: float) -> int:
        """Every engine drains at once, within the same `timeout`; returns how many requests were aborted."""
        return sum(await asyncio.gather(*(m.async_engine.drain(timeout) for m in self.models)))

    def shutdown(self) -> None:
        for m in self.models:
            m.async_engine.shutdown()

    def metrics_for(self, model: str | None) -> ServerMetrics:
        """The metrics a response for `model` counts in; the first model's when it names no served model."""
        return (self.get(model) or self.default).metrics

    def render_metrics(self) -> bytes:
        return render_metrics([m.metrics for m in self.models], self.metrics_prefix)
