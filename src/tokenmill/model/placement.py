"""Where a model runs: the CPU path (native kernels, the fused step) or the GPU path (`device="cuda"`): the same
model code with its packed weights turned into the Triton kernels' layout (quant/gpu_layout.py, never a float
copy) and every tensor on the GPU; attention goes to kernels/gpu/attention.py through the runner's per-row
metadata. Under Triton's interpreter (TRITON_INTERPRET=1, no GPU) the GPU path runs its kernels on CPU tensors:
that is how tests check it on this project's CPU-only machines."""
from __future__ import annotations

import torch

from tokenmill.config import DEVICES
from tokenmill.kernels import gpu
from tokenmill.model.llama import LlamaModel


def resolve_device(name: str) -> str:
    """"cpu" or "cuda" for EngineArgs.device `name`."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return "cuda" if gpu.available() else "cpu"
    if name == "cuda":
        gpu.tensor_device()  # says what is missing
    return name


def default_dtype(device: str) -> torch.dtype | None:
    """The GPU path's compute dtype for dtype="auto": bfloat16 on a GPU (float32 under the interpreter, which has
    no bfloat16); None on the CPU (its own rule, LLM)."""
    if device != "cuda":
        return None
    return torch.bfloat16 if gpu.tensor_device().type == "cuda" else torch.float32


def to_gpu(model: LlamaModel) -> LlamaModel:
    """The model on the GPU path, in place: packed layers in the GPU layout, the layers with GPU kernels
    (QuantizedLinear, QuantizedEmbedding, RMSNorm, RotaryEmbedding, MLP: their `to_gpu`) switched to them, then all
    tensors on the GPU."""
    device = gpu.tensor_device()
    for module in model.modules():
        if hasattr(module, "to_gpu"):
            module.to_gpu(device)
    return model.to(device)
