"""Benchmarks: load generation against OpenAI-compatible servers, offline and single-request latency runs.

Modules: datasets (what to send), load_generator (how and when to send it, and the per-request timings),
metrics (pure functions over those timings), report (console table, results JSON), serve / offline / latency
(the three benchmark kinds), plot, peers (server processes to compare against), compare (the same workloads
against each peer) and cli (the `tokenmill bench` arguments).
"""
from __future__ import annotations

from tokenmill.errors import TokenmillError


class BenchError(TokenmillError):
    """A benchmark cannot run as asked: a bad option, an unreachable server, a missing peer binary."""
