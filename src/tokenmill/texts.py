"""Texts shipped with tokenmill (data/): a held-out English text that evaluations score and another that
calibrations (GPTQ/AWQ, pruning, distillation, the KV cache's key smoothing) learn from, so no run needs a
download."""
from __future__ import annotations

from importlib import resources

EVAL_TEXT = "eval_en.txt"
CALIBRATION_TEXT = "calibration_en.txt"


def shipped_text(name: str) -> str:
    """A text shipped with tokenmill: EVAL_TEXT (held out) or CALIBRATION_TEXT."""
    return resources.files("tokenmill").joinpath("data", name).read_text(encoding="utf-8")
