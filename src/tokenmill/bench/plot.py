"""`bench plot`: latency-vs-throughput curves and latency CDFs from `bench serve` results files, as PNGs.

Curves group runs by their label (the server's name), one point per run, ordered by output throughput: the
usual way to read a serving system is how much latency it costs to push more tokens per second.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tokenmill.bench import BenchError
from tokenmill.bench.report import load_result

PANELS = (("ttft_ms", "ttft_s", "TTFT"), ("tpot_ms", "tpot_s", "TPOT"), ("itl_ms", "itl_s", "ITL"),
          ("e2el_ms", "latency", "E2E latency"))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("bench plot needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _run_name(doc: dict[str, Any]) -> str:
    config = doc["config"]
    return f"{config['label']} c={config['max_concurrency'] or 'inf'} rate={config['request_rate']}"


def _per_request(doc: dict[str, Any], field: str) -> list[float]:
    """The successful requests' values of one timing (ITL pooled); seconds."""
    values: list[float] = []
    for row in doc["requests"]:
        if row["success"]:
            value = row[field]
            values += value if isinstance(value, list) else [] if value is None else [value]
    return values


def latency_vs_throughput(docs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        groups[doc["config"]["label"]].append(doc)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, _, title) in zip(axes.flat, PANELS):
        for color, (label, runs) in zip(colors * len(groups), groups.items()):
            runs = sorted(runs, key=lambda d: d["metrics"]["output_throughput"])
            x = [d["metrics"]["output_throughput"] for d in runs]
            for stat, style in (("median", "-o"), ("p99", "--x")):
                y = [d["metrics"][key][stat] if d["metrics"][key] else float("nan") for d in runs]
                ax.plot(x, y, style, color=color, label=f"{label} {stat}")
            for xi, d in zip(x, runs):
                if d["metrics"][key]:
                    ax.annotate(f"c={d['config']['max_concurrency'] or 'inf'}", (xi, d["metrics"][key]["median"]),
                                fontsize=7, textcoords="offset points", xytext=(3, 3), color=color)
        ax.set(title=f"{title} vs throughput", xlabel="output tokens / s", ylabel=f"{title} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdfs(docs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (_, field, title) in zip(axes.flat, PANELS):
        for doc in docs:
            values = [1000 * v for v in _per_request(doc, field)]
            if values:
                ax.ecdf(values, label=_run_name(doc))
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction of requests" if field != "itl_s"
               else "fraction of token gaps", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(paths: list[Path], output_dir: Path) -> list[Path]:
    """Write latency_vs_throughput.png and latency_cdf.png into output_dir; returns their paths."""
    docs = [load_result(p) for p in paths]
    serve_docs = [d for d in docs if d["benchmark"] == "serve"]
    if not serve_docs:
        raise BenchError("bench plot draws `bench serve` results; none of the given files is one")
    output_dir.mkdir(parents=True, exist_ok=True)
    curves, cdfs = output_dir / "latency_vs_throughput.png", output_dir / "latency_cdf.png"
    latency_vs_throughput(serve_docs, curves)
    latency_cdfs(serve_docs, cdfs)
    return [curves, cdfs]
