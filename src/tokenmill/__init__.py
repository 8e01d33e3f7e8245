"""tokenmill: a fast LLM inference engine. Public API shaped like vLLM's.

The public names load on first use (PEP 562): `LLM` imports torch (seconds), which `tokenmill --help` and the
CLI's argument parsing must not wait for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.llm import LLM
    from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
    from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

_MODULES = {"LLM": "tokenmill.llm", "SamplingParams": "tokenmill.sampling_params", "RequestOutput": "tokenmill.outputs",
            "CompletionOutput": "tokenmill.outputs", "Logprob": "tokenmill.outputs",
            "StructuredOutputsParams": "tokenmill.sampling_params"}
__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
