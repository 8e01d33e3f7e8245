"""Serving metrics against values worked out by hand on synthetic per-request records."""
from __future__ import annotations

import pytest

from tokenmill.bench.metrics import (
    RequestRecord,
    compute_metrics,
    distribution,
    itl,
    meets_slos,
    parse_slos,
    tpot,
    ttft,
)
from tokenmill.bench.report import serve_table


def ok(index: int, chunks: list[float], latency: float, prompt: int, completion: int) -> RequestRecord:
    return RequestRecord(index, max_tokens=completion, chunk_times=chunks, latency=latency, prompt_tokens=prompt,
                         completion_tokens=completion, finish_reason="length", success=True)


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        ok(0, [0.1, 0.3, 0.6], 1.0, 10, 4),  # TTFT 100 ms, TPOT (1.0 - 0.1) / 3 = 300 ms, ITL 200 and 300 ms
        ok(1, [0.2, 0.4], 0.6, 20, 2),  # TTFT 200 ms, TPOT 0.4 / 1 = 400 ms, ITL 200 ms
        ok(2, [0.5], 0.5, 30, 1),  # TTFT 500 ms, one token: no TPOT, no ITL
        RequestRecord(3, 8, error="HTTP 500: boom"),
        # Broken after two chunks: its timings must not leak into any distribution or token total.
        RequestRecord(4, 8, chunk_times=[0.01, 0.02], error="broken stream: it ended before [DONE]"),
    ]


def test_per_request_definitions(records):
    r0, r1, r2 = records[:3]
    assert ttft(r0) == 0.1
    assert itl(r0) == pytest.approx([0.2, 0.3])
    assert tpot(r0) == pytest.approx(0.9 / 3)  # the first token is excluded: (e2e - ttft) / (n - 1)
    assert tpot(r1) == pytest.approx(0.4)
    assert tpot(r2) is None and itl(r2) == []
    assert ttft(RequestRecord(9, 4, success=True, latency=0.3, completion_tokens=0)) is None


def test_distribution_percentiles_by_hand():
    d = distribution([0.1, 0.2, 0.5])  # seconds in, milliseconds out; linear interpolation between ranks
    assert d.count == 3
    assert d.mean == pytest.approx(800 / 3)
    assert d.median == pytest.approx(200)
    assert d.p90 == pytest.approx(200 + 0.8 * 300)  # rank 0.9 * 2 = 1.8
    assert d.p95 == pytest.approx(200 + 0.9 * 300)
    assert d.p99 == pytest.approx(200 + 0.98 * 300)
    single = distribution([0.25])
    assert (single.mean, single.median, single.p99) == (250, 250, 250)
    assert distribution([]) is None


def test_run_metrics_by_hand(records):
    m = compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 2)
    assert m.errors == {"HTTP 500": 1, "broken stream": 1}
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.input_throughput == pytest.approx(30)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    assert m.ttft_ms.count == 3 and m.ttft_ms.mean == pytest.approx(800 / 3) and m.ttft_ms.p90 == pytest.approx(440)
    assert m.tpot_ms.count == 2 and m.tpot_ms.mean == pytest.approx(350) and m.tpot_ms.p90 == pytest.approx(390)
    assert m.itl_ms.count == 3  # 200, 300 from r0 and 200 from r1, pooled
    assert m.itl_ms.mean == pytest.approx(700 / 3) and m.itl_ms.median == pytest.approx(200)
    assert m.itl_ms.p90 == pytest.approx(280)
    assert m.e2el_ms.mean == pytest.approx(700) and m.e2el_ms.median == pytest.approx(600)
    assert m.e2el_ms.p99 == pytest.approx(600 + 0.98 * 400)
    assert m.goodput is None and m.slos_ms == {}


def test_all_failed_run_has_no_distributions(records):
    m = compute_metrics(records[3:], duration_s=1.0)
    assert (m.completed, m.failed, m.total_output_tokens) == (0, 2, 0)
    assert m.ttft_ms is None and m.tpot_ms is None and m.itl_ms is None and m.e2el_ms is None
    text = serve_table(m, max_concurrency=4, request_rate=float("inf"))
    assert "Median TTFT (ms):" in text and "n/a" in text
    assert "HTTP 500:" in text and "broken stream:" in text


@pytest.mark.parametrize("slos,good", [
    ({"ttft": 250, "tpot": 350}, 1),  # r0 only: r1's TPOT is 400, r2's TTFT is 500
    ({"tpot": 350}, 2),  # r0, and r2, whose single token has no decode phase
    ({"e2el": 600}, 2),  # r1 (600 is within) and r2
    ({"ttft": 1000, "tpot": 1000, "e2el": 1000}, 3),
])
def test_goodput_counts_requests_meeting_every_slo(records, slos, good):
    m = compute_metrics(records, duration_s=2.0, slos_ms=slos)
    assert m.goodput == pytest.approx(good / 2.0)
    assert sum(meets_slos(r, slos) for r in records) == good  # failed requests never count


def test_goodput_appears_in_the_table(records):
    text = serve_table(compute_metrics(records, 2.0, {"ttft": 250}), max_concurrency=None, request_rate=2.0)
    assert "Request goodput (req/s) [ttft:250]:" in text
    assert text.splitlines()[0].strip("=").strip() == "Serving Benchmark Result"


def test_parse_slos():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:2500.5"]) == {"ttft": 500, "tpot": 50, "e2el": 2500.5}
    for bad in ("itl:5", "ttft", "ttft:-1", "ttft:fast"):
        with pytest.raises(ValueError, match="METRIC:MILLISECONDS"):
            parse_slos([bad])


def test_duration_must_be_positive(records):
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(records, 0.0)
