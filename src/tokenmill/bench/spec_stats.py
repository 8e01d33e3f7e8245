"""Speculative-decoding numbers of a benchmark run: the engine's counters over the timed part, as vLLM reports
them (acceptance rate, mean acceptance length = 1 + accepted / drafts, acceptance by position)."""
from __future__ import annotations

from typing import Any

from tokenmill.bench.report import Row


def spec_decode_summary(before: Any, after: Any) -> dict[str, Any] | None:
    """From two SchedulerStats snapshots; None when speculation is not configured."""
    if not after.spec_accepted_per_pos:
        return None
    drafts = after.spec_num_drafts - before.spec_num_drafts
    draft_tokens = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    old = before.spec_accepted_per_pos or (0,) * len(after.spec_accepted_per_pos)
    per_pos = [a - b for a, b in zip(after.spec_accepted_per_pos, old)]
    by_method = {}
    for counters in after.spec_by_method:
        old_counters = next((c for c in before.spec_by_method if c.method == counters.method), None)
        drafts_m = counters.num_drafts - (old_counters.num_drafts if old_counters else 0)
        accepted_m = counters.num_accepted_tokens - (old_counters.num_accepted_tokens if old_counters else 0)
        by_method[counters.method] = {"num_drafts": drafts_m, "num_accepted_tokens": accepted_m,
                                      "mean_acceptance_length": 1 + accepted_m / drafts_m if drafts_m else None}
    return {"method": after.spec_method, "by_method": by_method,
            "propose_seconds": after.spec_propose_seconds - before.spec_propose_seconds,
            "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "acceptance_rate_per_pos": [n / drafts for n in per_pos] if drafts else None}


def spec_decode_rows(summary: dict[str, Any] | None) -> list[Row]:
    if summary is None:
        return []
    per_pos = summary["acceptance_rate_per_pos"]
    return [("Proposer", summary["method"]), ("Time proposing (s)", summary["propose_seconds"]),
            ("Drafts", summary["num_drafts"]), ("Draft tokens", summary["num_draft_tokens"]),
            ("Accepted tokens", summary["num_accepted_tokens"]),
            ("Draft acceptance rate", summary["acceptance_rate"]),
            ("Mean acceptance length", summary["mean_acceptance_length"]),
            ("Acceptance by position", " ".join(f"{r:.2f}" for r in per_pos) if per_pos else None),
            *((f"Drafts by {method} (mean acceptance length)",
               f"{m['num_drafts']} ({m['mean_acceptance_length']:.2f})" if m["num_drafts"] else "0")
              for method, m in summary["by_method"].items() if len(summary["by_method"]) > 1)]
