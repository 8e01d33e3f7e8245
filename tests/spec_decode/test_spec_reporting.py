"""Speculation counters where users read them: /metrics under vLLM's names, and `tokenmill bench latency`."""
from __future__ import annotations

from tinymodel import write_tiny_llama
from tokenmill.model.loader.checkpoint import load_checkpoint


def test_metrics_endpoint_exports_vllm_named_spec_counters():
    from types import SimpleNamespace

    from tokenmill.config import CacheInfo
    from tokenmill.engine.stats import SchedulerStats, SpecCounters
    from tokenmill.server.metrics import ServerMetrics, render_metrics

    cache = CacheInfo(10, 16, "float16", 4096)

    # a "mix" config: the counters per proposer it chose (they sum to the totals)
    stats = SchedulerStats(1, 0, 2, 10, 0.5, 0, 0, 0, 7, spec_num_drafts=5, spec_num_draft_tokens=14,
                           spec_num_accepted_tokens=8, spec_accepted_per_pos=(5, 2, 1), spec_method="mix",
                           spec_propose_seconds=0.3,
                           spec_by_method=(SpecCounters("suffix", 4, 12, 7, (4, 2, 1), 0.25),
                                           SpecCounters("ngram", 1, 2, 1, (1, 0, 0), 0.05)))
    assert SchedulerStats(*vars(stats).values()) == stats  # the engine core process sends the fields as a tuple
    text = render_metrics([ServerMetrics(SimpleNamespace(stats=stats, cache_info=cache), "m")]).decode()
    for line in ('tokenmill:spec_decode_num_drafts_total{method="suffix",model_name="m"} 4.0',
                 'tokenmill:spec_decode_num_draft_tokens_total{method="suffix",model_name="m"} 12.0',
                 'tokenmill:spec_decode_num_accepted_tokens_total{method="suffix",model_name="m"} 7.0',
                 'tokenmill:spec_decode_propose_seconds_total{method="suffix",model_name="m"} 0.25',
                 'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{method="suffix",model_name="m",position="2"} '
                 '1.0',
                 'tokenmill:spec_decode_num_drafts_total{method="ngram",model_name="m"} 1.0',
                 'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{method="ngram",model_name="m",position="0"} '
                 '1.0'):
        assert line in text
    assert 'method="mix"' not in text  # per proposer only: summing over `method` gives the totals
    plain = render_metrics([ServerMetrics(SimpleNamespace(stats=SchedulerStats(0, 0, 0, 10, 0.0, 0, 0, 0, 0),
                                                          cache_info=cache), "m")])
    assert b"spec_decode" not in plain  # not configured: not exported (as vLLM)


def test_bench_latency_prints_speculation_numbers(tmp_path, capsys):
    from tokenmill.cli import main

    write_tiny_llama(tmp_path, load_checkpoint().tokenizer, seed=3)  # the full vocabulary: real-text prompts
    assert main(["bench", "latency", "--model", str(tmp_path), "--dtype", "float32", "--input-len", "24",
                 "--output-len", "12", "--num-iters", "1", "--num-iters-warmup", "0", "--kv-cache-memory", "4000000",
                 "--speculative-config", '{"method": "draft_model", "num_speculative_tokens": 2, "mode": "always"}'
                 ]) in (0, None)
    out = capsys.readouterr().out
    assert "Speculative Decoding" in out and "Mean acceptance length:" in out and "draft_model" in out
    assert "Time proposing (s):" in out
    assert "Draft acceptance rate:                   1.00" in out  # the target drafting for itself
