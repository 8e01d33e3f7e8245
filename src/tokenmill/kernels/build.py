"""Compile tokenmill's C++ kernels once per machine kind and load them with ctypes.

Why ctypes and a plain g++ call instead of torch.utils.cpp_extension: the kernels take raw pointers, so they
need no torch headers; a build takes ~2 s instead of ~1 min, and a ctypes call costs ~1 us against ~5 us
through the dispatcher. They link the OpenMP runtime torch already loaded (libgomp.so.1), so kernels and
torch share one thread pool. Builds are cached under $TOKENMILL_CACHE_DIR (default ~/.cache/tokenmill), keyed by
the sources, flags and compiler, and are written atomically so concurrent processes cannot see half a file.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels bind to the same OpenMP runtime)

from tokenmill.hardware import cpu_flags

logger = logging.getLogger("tokenmill.kernels")

SOURCES = ("quant_linear.cpp", "tiled_matmul.cpp", "layer_ops.cpp", "paged_attention.cpp", "decode_step.cpp")
REQUIRED_FLAGS = frozenset({"avx2", "fma", "f16c"})
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
VNNI_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
VNNI_CXXFLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_int8"})
AMX_CXXFLAGS = (*VNNI_CXXFLAGS, "-mamx-tile", "-mamx-int8")


def isa_flags() -> tuple[str, ...]:
    """Compiler flags beyond AVX2 that this CPU allows: AVX512-VNNI makes each int8 dot one instruction
    (vpdpbusd) instead of three; AMX multiplies 16 rows by 16 over a 32-block in one (products of 32-64 rows and
    more, tiled_matmul.cpp's kAmxMinRows). The integer sums are the same, so results do not change with the build."""
    flags = cpu_flags()
    if not VNNI_CPU_FLAGS <= flags:
        return ()
    return AMX_CXXFLAGS if AMX_CPU_FLAGS <= flags else VNNI_CXXFLAGS


def isa_name(lib: ctypes.CDLL) -> str:
    """What the kernel build `lib` runs on here, in words (for logs and benchmark records)."""
    if lib.tm_amx_in_use():
        return "AVX-512 VNNI + AMX"
    return "AVX-512 VNNI" if isa_flags() else "AVX2"


class KernelBuildError(RuntimeError):
    """The native kernels cannot be built or loaded here; callers fall back to plain PyTorch."""


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill")


INSTALL_HINT = "install g++ (`apt-get install g++` on Debian/Ubuntu, `dnf install gcc-c++` on Fedora/RHEL)"


def _compiler() -> tuple[str, str]:
    """The C++ compiler to build with ($CXX, else g++ or c++ on PATH) and its `--version` text, which keys the
    build cache. One that is missing or does not run is a KernelBuildError, so callers fall back."""
    cxx = os.environ.get("CXX")
    if cxx and not shutil.which(cxx):
        raise KernelBuildError(f"CXX={cxx} is not an executable file; unset CXX or point it at a C++ compiler")
    cxx = cxx or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelBuildError(f"no C++ compiler found (g++ or c++ on PATH, or $CXX); {INSTALL_HINT}")
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"the C++ compiler {cxx} does not run: {exc}") from None
    if result.returncode != 0:
        raise KernelBuildError(f"`{cxx} --version` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return cxx, result.stdout


@functools.cache
def load_library(extra_flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """The compiled kernel library, built with CXXFLAGS + `extra_flags` (default: isa_flags()); raises
    KernelBuildError where the CPU or the toolchain cannot run it."""
    missing = REQUIRED_FLAGS - cpu_flags()
    if missing:
        raise KernelBuildError(f"CPU lacks {' '.join(sorted(missing))}")
    src_dir = Path(__file__).parent / "csrc"
    flags = (*CXXFLAGS, *(isa_flags() if extra_flags is None else extra_flags))
    cxx, version = _compiler()
    digest = hashlib.sha256("\0".join([version, *flags]).encode())
    for path in sorted(src_dir.iterdir()):  # sources and headers
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_dir() / "kernels" / f"libtokenmill_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(cxx, flags, [src_dir / n for n in SOURCES], target)
    return _declare(ctypes.CDLL(str(target)))


_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # argument types of every exported kernel (see csrc/ for what each does)
    "tm_linear": [_p, _i, _p, _p],
    "tm_dequantize": [_p, _p, _i64, _p],
    "tm_rms_norm": [_p, _i64, _p, _f, _i, _i, _p],
    "tm_act_and_mul": [_p, _i, _i, _i, _p],
    "tm_rotary": [_p, _i64, _p, _i64, _p, _p, _p, _i, _i, _i, _i],
    "tm_write_kv": [_p, _p, _i64, _p, _i, _i, _i, _p, _p, _p, _p, _p, _p, _p, _i, _p, _p, _p, _i, _i],
    "tm_paged_decode_attention": [_p, _i64, _p, _p, _p, _p, _p, _p, _p, _i, _p, _i, _i, _i, _i, _i, _f, _i, _i,
                                  _p, _p, _p, _i, _p],
    "tm_decode_layers": [_p, _i, _p, _p, _i, _p, _p],
}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.tm_amx_in_use.argtypes, lib.tm_amx_in_use.restype = [], ctypes.c_int
    return lib


def _compile(cxx: str, flags: tuple[str, ...], sources: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *flags, *map(str, sources), "-o", tmp]
    logger.info("building native kernels (once per CPU kind and compiler): %s", " ".join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        os.unlink(tmp)
        raise KernelBuildError(f"the C++ compiler {cxx} does not run: {exc}") from None
    if result.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"kernel build failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, target)
