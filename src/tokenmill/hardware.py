"""What this CPU can do, read once: it decides the default compute dtype and is recorded with benchmarks."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """bf16 GEMMs are ~600x faster with AVX512-BF16/AMX than emulated on AVX2-only CPUs."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" picks bfloat16 where the CPU computes it natively, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of 'auto', {', '.join(map(repr, DTYPES))}; got {name!r}")
    return DTYPES[name]


def memory_read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s that summing a large float32 buffer reaches with torch's threads (best of `repeats`): the
    ceiling a bandwidth-bound decode step can approach. The buffer is far larger than any L3 cache."""
    import time

    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def describe() -> dict[str, str]:
    """One-line facts to store next to every measurement."""
    flags = cpu_flags()
    interesting = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {
        "cpu": platform.processor() or platform.machine(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
        "flags": " ".join(interesting),
        "torch": torch.__version__,
    }
