"""Prometheus metrics under vLLM's names with the `tokenmill:` prefix, so vLLM dashboards work after a rename.

Each served model has its own CollectorRegistry (two servers in one process, or tests, never share counts), all
labelled `model_name` as vLLM does; /metrics merges a server's models into one exposition. Latencies
are observed once per finished request from the engine's own timestamps; engine state (running, waiting, KV
use, prefix cache, preemptions, speculative decoding counters) is read at scrape time from AsyncEngine.stats,
which every message from the engine core process refreshes. cache_config_info carries the KV cache's
configuration in its labels, as vLLM's does.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.stats import SchedulerStats
from tokenmill.outputs import RequestOutput

P = "tokenmill:"
MODEL_NAME_KEY = "model_name"  # set in the request's state by the route that picks a model
# vLLM's buckets, so percentiles line up when the two are compared.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, async_engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(P + name, doc, list(labels), buckets=buckets, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(P + name, doc, list(labels), registry=self.registry).labels(**labels)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", _TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Per request: decode time / (output tokens - 1).", _TOKEN_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Gap between consecutive tokens of a sequence, as the server receives them.",
                             _TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished and aborted requests.")
        self.success = Counter(P + "request_success", "Finished sequences by finish reason.",
                               [*labels, "finished_reason"], registry=self.registry)
        self.result_cache_hits = counter("result_cache_hits", "Requests answered from the result cache.")
        self.result_cache_misses = counter("result_cache_misses",
                                           "Cacheable requests the result cache did not hold (they ran).")
        self.errors = Counter(P + "request_errors", "Error responses by HTTP status code.",
                              [*labels, "status_code"], registry=self.registry)
        self._labels = labels
        cache = asdict(async_engine.cache_info)
        values = {k: "" if v is None else str(v) for k, v in cache.items()}
        Gauge(P + "cache_config_info", "The KV cache's configuration, in the labels (always 1).", [*labels, *cache],
              registry=self.registry).labels(**labels, **values).set(1)
        self.registry.register(_EngineStatsCollector(async_engine, model_name))

    def observe_finished(self, out: RequestOutput) -> None:
        """One finished request (all of its n sequences)."""
        m = out.metrics
        arrival, first_token, finished = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        if "first_scheduled_time" in m:
            self.queue.observe(m["first_scheduled_time"] - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
        if finished is not None:
            self.e2e.observe(finished - arrival)
        longest = max(len(c.token_ids) for c in out.outputs)
        if first_token is not None and finished is not None and longest > 1:
            self.tpot.observe((finished - first_token) / (longest - 1))
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.success.labels(**self._labels, finished_reason=c.finish_reason or "abort").inc()

    def observe_aborted(self, num_sequences: int, num_generated: int) -> None:
        """Sequences dropped because the client left (no final output comes back for those)."""
        self.generation_tokens.inc(num_generated)
        self.success.labels(**self._labels, finished_reason="abort").inc(num_sequences)

    def count_error(self, status: int) -> None:
        self.errors.labels(**self._labels, status_code=str(status)).inc()



def render_metrics(metrics: Sequence[ServerMetrics], prefix: str = "tokenmill") -> bytes:
    """Several models' metrics as one exposition: each family once, its samples told apart by `model_name`.
    prefix "vllm": every name as vLLM's (`vllm:num_requests_waiting`, ...), for scrapers that know only those
    (the Gateway API Inference Extension's endpoint picker, llm-d, KServe)."""
    prefix += ":"
    families = [family for m in metrics for family in m.registry.collect()]  # built afresh: safe to change
    if prefix != P:
        for family in families:
            family.name = prefix + family.name.removeprefix(P)
            family.samples = [s._replace(name=prefix + s.name.removeprefix(P)) for s in family.samples]
    return exposition(families)


def exposition(families: Iterable[Metric]) -> bytes:
    """The text exposition of `families`, each name once: same-named families (other models', other replicas')
    are joined, their samples told apart by their labels."""
    merged: dict[str, Metric] = {}
    for family in families:
        if (seen := merged.get(family.name)) is None:
            merged[family.name] = family
        else:
            seen.samples.extend(family.samples)
    return generate_latest(_Families(list(merged.values())))


class _Families:
    """A collector of ready families, as generate_latest takes one."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class _EngineStatsCollector:
    """Engine state as of the core's last message (sent after each step or command), read when Prometheus scrapes."""

    def __init__(self, async_engine: AsyncEngine, model_name: str) -> None:
        self.async_engine = async_engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.async_engine.stats
        values = [
            (GaugeMetricFamily, "num_requests_running", "Sequences in the running batch.", s.num_running),
            (GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).",
             s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
            (GaugeMetricFamily, "prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up.",
             s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            (CounterMetricFamily, "num_preemptions", "Sequences preempted to free KV blocks.", s.num_preemptions),
        ]
        for family, name, doc, value in values:
            metric = family(P + name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric
        if s.spec_accepted_per_pos:  # speculative decoding is configured (vLLM exports these only then, too)
            yield from self._spec_decode(s)

    def _spec_decode(self, s: SchedulerStats) -> Iterator[Metric]:
        """vLLM's counters, labelled with the proposer (`method`; a "mix" config's per proposer it chose), and
        the time spent proposing."""
        for name, doc, field in (
                ("spec_decode_num_drafts", "Verified speculative proposals.", "num_drafts"),
                ("spec_decode_num_draft_tokens", "Proposed (draft) tokens verified.", "num_draft_tokens"),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", "num_accepted_tokens"),
                ("spec_decode_propose_seconds", "Time spent proposing drafts.", "propose_seconds")):
            metric = CounterMetricFamily(P + name, doc, labels=["model_name", "method"])
            for counters in s.spec_by_method:
                metric.add_metric([self.model_name, counters.method], getattr(counters, field))
            yield metric
        per_pos = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "method", "position"])
        for counters in s.spec_by_method:
            for position, count in enumerate(counters.accepted_per_pos):
                per_pos.add_metric([self.model_name, counters.method, str(position)], count)
        yield per_pos


class ErrorCountingMiddleware:
    """Counts every error response by status, wherever it came from (auth, routing, validation, engine), on
    the model the route chose (`scope["state"]["model_name"]`), else on what `metrics_for(None)` gives."""

    def __init__(self, app: ASGIApp, metrics_for: Callable[[str | None], ServerMetrics]) -> None:
        self.app = app
        self.metrics_for = metrics_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self._count(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            self._count(scope, 500)  # Starlette's outermost middleware turns it into a 500
            raise

    def _count(self, scope: Scope, status: int) -> None:
        self.metrics_for(scope.get("state", {}).get(MODEL_NAME_KEY)).count_error(status)
