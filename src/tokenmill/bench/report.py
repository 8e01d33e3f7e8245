"""Results out: the console table (laid out like `vllm bench serve`'s) and the results JSON.

A results file holds the config, the machine (hardware.describe()), the summary metrics and, for serving runs,
every request's raw timings, so any number in the table can be recomputed or plotted later.
"""
from __future__ import annotations

import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenmill.bench import BenchError
from tokenmill.bench.metrics import BenchmarkMetrics, Distribution, RequestRecord, itl, tpot, ttft

WIDTH = 50
Row = tuple[str, Any]  # (label, value); a value of None prints as n/a
SECTIONS = (("ttft_ms", "Time to First Token", "TTFT"), ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
            ("itl_ms", "Inter-token Latency", "ITL"), ("e2el_ms", "End-to-end Latency", "E2EL"))


def _value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(title: str, sections: list[tuple[str | None, list[Row]]]) -> str:
    """Title bar, then each section (an optional dashed heading and its rows), then a closing bar."""
    lines = [f" {title} ".center(WIDTH, "=")]
    for heading, rows in sections:
        if heading:
            lines.append(heading.center(WIDTH, "-"))
        lines += [f"{label + ':':<40} {_value(value)}" for label, value in rows]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _distribution_rows(name: str, dist: Distribution | None) -> list[Row]:
    values = asdict(dist) if dist else {}
    return [(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name} (ms)", values.get(stat))
            for stat in ("mean", "median", "p90", "p95", "p99")]


def serve_table(metrics: BenchmarkMetrics, max_concurrency: int | None, request_rate: float) -> str:
    head: list[Row] = [
        ("Successful requests", metrics.completed), ("Failed requests", metrics.failed),
        ("Maximum request concurrency", max_concurrency), ("Request rate configured (RPS)", request_rate),
        ("Benchmark duration (s)", metrics.duration_s), ("Total input tokens", metrics.total_input_tokens),
        ("Total generated tokens", metrics.total_output_tokens),
        ("Request throughput (req/s)", metrics.request_throughput),
        ("Input token throughput (tok/s)", metrics.input_throughput),
        ("Output token throughput (tok/s)", metrics.output_throughput),
        ("Total token throughput (tok/s)", metrics.total_token_throughput),
    ]
    if metrics.slos_ms:
        slos = " ".join(f"{k}:{v:g}" for k, v in metrics.slos_ms.items())
        head.append((f"Request goodput (req/s) [{slos}]", metrics.goodput))
    sections: list[tuple[str | None, list[Row]]] = [(None, head)]
    sections += [(heading, _distribution_rows(short, getattr(metrics, key))) for key, heading, short in SECTIONS]
    if metrics.errors:
        sections.append(("Failed requests by kind", sorted(metrics.errors.items())))
    return table("Serving Benchmark Result", sections)


def request_rows(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """Every request's raw record plus its derived TTFT / TPOT / ITLs (seconds)."""
    return [{**asdict(r), "ttft_s": ttft(r), "tpot_s": tpot(r), "itl_s": itl(r)} for r in records]


def result_document(kind: str, config: dict[str, Any], summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The results JSON: what ran (config, command, machine), what it measured, and any raw data in `extra`."""
    from tokenmill.hardware import describe

    return {"benchmark": kind, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": sys.argv, "config": config, "hardware": describe(), "metrics": summary, **extra}


def save_result(path: Path, document: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def load_result(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read the results file {path}: {exc}") from exc
    if not isinstance(document, dict) or "benchmark" not in document:
        raise BenchError(f"{path} is not a tokenmill bench results file (no 'benchmark' key)")
    return document
