"""`bench plot` draws PNGs from results files (matplotlib comes with the test extra)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

import pytest

from tokenmill.bench import BenchError
from tokenmill.bench.metrics import RequestRecord, compute_metrics
from tokenmill.bench.report import request_rows, result_document, save_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def serve_document(label: str, concurrency: int, scale: float) -> dict:
    records = [RequestRecord(i, 4, chunk_times=[scale * (0.1 + 0.01 * i), scale * 0.2, scale * 0.3, scale * 0.35],
                             latency=scale * 0.4, prompt_tokens=10, completion_tokens=4, success=True)
               for i in range(6)] + [RequestRecord(6, 4, error="HTTP 500: x")]
    metrics = compute_metrics(records, duration_s=scale * 2 / concurrency)
    config = {"label": label, "max_concurrency": concurrency, "request_rate": "inf"}
    return result_document("serve", config, asdict(metrics), requests=request_rows(records))


def test_plot_writes_curves_and_cdfs(tmp_path):
    paths = []
    for label, scale in (("tokenmill", 1.0), ("llama.cpp", 0.8)):
        for c in (1, 4):
            paths.append(tmp_path / f"{label}_c{c}.json")
            save_result(paths[-1], serve_document(label, c, scale * c ** 0.5))
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "plot", *map(str, paths), "-o",
                           str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("latency_vs_throughput.png", "latency_cdf.png"):
        png = tmp_path / "plots" / name
        assert str(png) in proc.stdout
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


def test_plot_rejects_files_that_are_not_serve_results(tmp_path):
    from tokenmill.bench.plot import plot_results

    offline = tmp_path / "offline.json"
    save_result(offline, result_document("offline", {}, {}))
    with pytest.raises(BenchError, match="none of the given files"):
        plot_results([offline], tmp_path)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(BenchError, match="not a tokenmill bench results file"):
        plot_results([tmp_path / "junk.json"], tmp_path)
