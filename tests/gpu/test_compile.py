"""Every GPU-path kernel compiles for a Hopper GPU (sm_90, to a cubin with Triton's own ptxas), checked here without
a GPU; see compile_for_gpu.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the GPU path's kernels need Triton: pip install 'tokenmill[gpu]'")


@pytest.mark.slow  # 30-50 s with Triton's cache cold
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "kernels for sm_90" in run.stdout
