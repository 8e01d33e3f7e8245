"""What this CPU can do, read once: it decides the default compute dtype and is recorded with benchmarks."""
from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path, PurePosixPath

import torch

from tokenmill.config import DTYPE_ALIASES, DTYPE_NAMES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

logger = logging.getLogger("tokenmill.hardware")


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
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPE_NAMES))}; got {name!r}")
    name = DTYPE_ALIASES.get(name, name)
    if name == "float16":  # arithmetic emulated on CPUs: vLLM's CPU backend casts it to bfloat16 too
        dtype = resolve_dtype("auto")
        logger.warning("dtype float16 is emulated on CPUs; computing in %s", str(dtype).removeprefix("torch."))
        return dtype
    return DTYPES[name]


def resolve_threads(threads: int | None) -> int:
    """The compute thread count: `threads` if given, else OMP_NUM_THREADS as torch already read it, else the CPUs
    this process really has. The fused decode step syncs its threads at barriers many times per token, so one
    thread more than the free cores (a quota, another busy process) stalls every barrier."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded down, at least
    1). os.cpu_count() and OpenMP's default count the host's cores, which a container's quota does not give."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota()
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the tightest cgroup quota on this process allows (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us / cpu.cfs_period_us`), checked from its own cgroup up to the root; None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1): controllers -> the process's cgroup
    groups = {controllers: path
              for _, controllers, path in (line.split(":", 2) for line in lines if line.count(":") >= 2)}
    quotas = [_v2_quota(d) for d in _cgroup_dirs(root, groups.get("", "/"))]
    v1_path = next((path for controllers, path in groups.items() if "cpu" in controllers.split(",")), "/")
    for mount in (root / "cpu", root / "cpu,cpuacct"):
        quotas += [_v1_quota(d) for d in _cgroup_dirs(mount, v1_path)]
    limits = [q for q in quotas if q is not None]
    return min(limits) if limits else None


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` under `mount` and each of its ancestors (a parent's quota binds too)."""
    rel = PurePosixPath(path.lstrip("/"))
    return [mount / rel, *(mount / parent for parent in rel.parents)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # no such cgroup file: this level sets no limit
        return None


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")  # "max 100000" (no limit) or "200000 100000" (2 CPUs)
    if text is None or text.startswith("max"):
        return None
    quota, _, period = text.partition(" ")
    return _ratio(folder / "cpu.max", quota, period)


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None or quota.startswith("-"):  # -1: no limit
        return None
    return _ratio(folder / "cpu.cfs_quota_us", quota, period)


def _ratio(path: Path, quota: str, period: str) -> float | None:
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        logger.warning("ignoring unreadable CPU quota in %s: %r / %r", path, quota, period)
        return None


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
