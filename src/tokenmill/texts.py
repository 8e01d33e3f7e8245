"""Texts shipped with tokenmill (data/): a held-out English text that evaluations score, another that
calibrations (GPTQ/AWQ, pruning, distillation, the KV cache's key smoothing) learn from, and a set of realistic
requests that benchmarks send and distillation has the teacher answer, so no run needs a download."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

EVAL_TEXT = "eval_en.txt"
CALIBRATION_TEXT = "calibration_en.txt"
# per category, the first builtin prompts: benchmarks' chat and code workloads, which distillation never trains on
HELD_OUT = {"question": 16, "code": 4}


def shipped_text(name: str) -> str:
    """A text shipped with tokenmill: EVAL_TEXT (held out) or CALIBRATION_TEXT."""
    return resources.files("tokenmill").joinpath("data", name).read_text(encoding="utf-8")


@cache
def builtin_prompts() -> tuple[dict[str, Any], ...]:
    """The shipped prompt set: dicts with id, category and prompt."""
    return tuple(json.loads(shipped_text("prompts.json"))["prompts"])


def held_out_prompts(category: str) -> list[dict[str, Any]]:
    """The first HELD_OUT[category] builtin prompts of `category`."""
    return [p for p in builtin_prompts() if p["category"] == category][:HELD_OUT[category]]


def training_prompts() -> list[dict[str, Any]]:
    """The builtin prompts no benchmark holds out."""
    held = {p["id"] for category in HELD_OUT for p in held_out_prompts(category)}
    return [p for p in builtin_prompts() if p["id"] not in held]
