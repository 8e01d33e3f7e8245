"""`bench serve`: one serving workload against one server, from requests to a results document."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from tokenmill.bench.datasets import DatasetConfig, SampleRequest
from tokenmill.bench.load_generator import ServeConfig, run
from tokenmill.bench.metrics import compute_metrics
from tokenmill.bench.report import request_rows, result_document, serve_table


def serve_benchmark(config: ServeConfig, dataset: DatasetConfig, requests: list[SampleRequest],
                    slos_ms: dict[str, float], label: str) -> tuple[dict[str, Any], str]:
    """Run the requests against the server; returns the results document and the console table."""
    result = run(config, requests)
    metrics = compute_metrics(result.records, result.duration_s, slos_ms)
    settings = {k: v for k, v in asdict(config).items() if k not in ("api_key", "progress")}
    settings |= {"label": label, "model": result.model,
                 "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
                 "dataset": {k: str(v) if k == "path" and v else v for k, v in asdict(dataset).items()}}
    document = result_document("serve", settings, asdict(metrics), requests=request_rows(result.records))
    return document, serve_table(metrics, config.max_concurrency, config.request_rate)
