"""Serving metrics as pure functions of per-request records, so every number can be checked by hand.

Definitions (as `vllm bench serve` uses them):
- TTFT: from sending the request to the first chunk that carries content.
- ITL: the gaps between consecutive content chunks (pooled over requests; a chunk may hold several tokens).
- TPOT: (e2e - TTFT) / (completion_tokens - 1), the decode time per token after the first; undefined for
  one-token outputs.
- E2E latency: from sending to the end of the stream ([DONE]).
Token counts come from the server's usage, never from the client's guess. Failed requests are counted and
their errors tallied, but they are left out of every latency distribution and token total.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request did, as the client saw it; times are seconds."""

    index: int
    max_tokens: int
    prompt_len: int | None = None  # the dataset's own count, kept for reference only
    send_time: float = 0.0  # when it was sent, from the start of the run
    chunk_times: list[float] = field(default_factory=list)  # content chunks' arrival, from send_time
    latency: float | None = None  # end of stream, from send_time
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    finish_reason: str | None = None
    success: bool = False
    error: str | None = None  # "KIND: detail" for a failed request


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    count: int
    mean: float
    median: float
    p90: float
    p95: float
    p99: float


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    input_throughput: float  # prompt tokens / s
    output_throughput: float  # completion tokens / s
    total_token_throughput: float
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2el_ms: Distribution | None
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    slos_ms: dict[str, float] = field(default_factory=dict)
    goodput: float | None = None  # requests / s meeting every SLO; None when no SLO was given


def distribution(values_s: Sequence[float]) -> Distribution | None:
    """Mean and percentiles (numpy's linear interpolation) in ms; None when there is nothing to summarize."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return Distribution(len(ms), float(ms.mean()), float(p50), float(p90), float(p95), float(p99))


def ttft(record: RequestRecord) -> float | None:
    return record.chunk_times[0] if record.chunk_times else None


def itl(record: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(record.chunk_times, record.chunk_times[1:])]


def tpot(record: RequestRecord) -> float | None:
    """Decode time per output token, the first token excluded: it is paid for by prefill, i.e. TTFT."""
    first = ttft(record)
    if first is None or record.latency is None or not record.completion_tokens or record.completion_tokens < 2:
        return None
    return (record.latency - first) / (record.completion_tokens - 1)


def parse_slos(specs: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if name not in SLO_METRICS or limit <= 0:
            raise ValueError(f"an SLO is METRIC:MILLISECONDS with METRIC one of {', '.join(SLO_METRICS)} and a "
                             f"positive limit, got {spec!r}")
        slos[name] = limit
    return slos


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A successful request within every limit. A one-token output has no decode phase, so it meets any TPOT
    limit; a request that streamed no content has no TTFT and meets no TTFT limit."""
    if not record.success:
        return False
    values = {"ttft": ttft(record), "tpot": tpot(record), "e2el": record.latency}
    for name, limit in slos_ms.items():
        value = values[name]
        if value is None:
            if name == "tpot":
                continue
            return False
        if value * 1000.0 > limit:
            return False
    return True


def error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Failed requests by kind (the part of the error before the first colon)."""
    return dict(Counter((r.error or "unknown").split(":", 1)[0] for r in records if not r.success))


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    inputs = sum(r.prompt_tokens or 0 for r in ok)
    outputs = sum(r.completion_tokens or 0 for r in ok)
    firsts = [t for t in map(ttft, ok) if t is not None]
    per_token = [t for t in map(tpot, ok) if t is not None]
    gaps = [gap for r in ok for gap in itl(r)]
    ends = [r.latency for r in ok if r.latency is not None]
    slos_ms = dict(slos_ms or {})
    return BenchmarkMetrics(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        total_input_tokens=inputs, total_output_tokens=outputs,
        request_throughput=len(ok) / duration_s, input_throughput=inputs / duration_s,
        output_throughput=outputs / duration_s, total_token_throughput=(inputs + outputs) / duration_s,
        ttft_ms=distribution(firsts), tpot_ms=distribution(per_token), itl_ms=distribution(gaps),
        e2el_ms=distribution(ends), errors=error_counts(records), slos_ms=slos_ms,
        goodput=sum(meets_slos(r, slos_ms) for r in ok) / duration_s if slos_ms else None,
    )
