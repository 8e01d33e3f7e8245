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
HELD_OUT_PROMPTS = 16  # the first builtin prompts: benchmarks' chat workloads; distillation never trains on them


def shipped_text(name: str) -> str:
    """A text shipped with tokenmill: EVAL_TEXT (held out) or CALIBRATION_TEXT."""
    return resources.files("tokenmill").joinpath("data", name).read_text(encoding="utf-8")


@cache
def builtin_prompts() -> tuple[dict[str, Any], ...]:
    """The shipped prompt set: dicts with id, category and prompt."""
    return tuple(json.loads(shipped_text("prompts.json"))["prompts"])
