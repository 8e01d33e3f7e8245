"""`--metrics-prefix vllm`: the names the Gateway API Inference Extension (llm-d, KServe) scrapes from an engine."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.config import CacheInfo
from tokenmill.engine.stats import SchedulerStats
from tokenmill.server.metrics import ServerMetrics, render_metrics
from tokenmill.server.models import ModelRegistry


def exposition(prefix: str) -> dict[str, float]:
    stats = SchedulerStats(3, 5, 8, 10, 0.5, 100, 40, 0, 7)
    metrics = ServerMetrics(SimpleNamespace(stats=stats, cache_info=CacheInfo(10, 16, "float16", 4096)), "m")
    metrics.result_cache_hits.inc()
    text = render_metrics([metrics], prefix).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_vllm_prefix_gives_the_names_an_inference_pool_reads():
    samples = exposition("vllm")
    assert samples["vllm:num_requests_running"] == 3
    assert samples["vllm:num_requests_waiting"] == 5
    assert samples["vllm:kv_cache_usage_perc"] == pytest.approx(0.8)
    assert samples["vllm:cache_config_info"] == 1
    assert samples["vllm:result_cache_hits_total"] == 1
    assert not [name for name in samples if name.startswith("tokenmill:")]
    ours = exposition("tokenmill")
    assert {name.removeprefix("tokenmill:") for name in ours} == {name.removeprefix("vllm:") for name in samples}


def test_unknown_prefix_is_refused():
    with pytest.raises(ValueError, match="--metrics-prefix must be one of tokenmill, vllm"):
        ModelRegistry([SimpleNamespace(served_model_name="m", accepted_model_names=frozenset())], "sglang")
