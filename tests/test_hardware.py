"""What the CPU offers: thread counts from the affinity mask and (faked) cgroup quotas; vLLM's dtype names."""
from __future__ import annotations

import logging

import pytest
import torch

from tokenmill import hardware


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_is_the_tightest_from_own_cgroup_up(tmp_path):
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/a/b\n")
    _write(tmp_path / "fs/a/b/cpu.max", "max 100000\n")
    _write(tmp_path / "fs/a/cpu.max", "150000 100000\n")
    _write(tmp_path / "fs/cpu.max", "400000 100000\n")
    assert hardware.cgroup_cpu_quota(tmp_path / "fs", proc) == 1.5


def test_v1_quota_falls_back_to_the_mount_root(tmp_path):
    """Inside a container without a cgroup namespace, /proc/self/cgroup names the host's path, which is not
    mounted there: the container's own limit is on the mount root."""
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:cpu,cpuacct:/docker/0123abcd\n1:memory:/docker/0123abcd\n")
    _write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert hardware.cgroup_cpu_quota(tmp_path / "fs", proc) == 2.0


@pytest.mark.parametrize("files", [{}, {"cpu.max": "max 100000"},
                                   {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}])
def test_no_quota(tmp_path, files):
    for name, text in files.items():
        _write(tmp_path / "fs" / name, text)
    assert hardware.cgroup_cpu_quota(tmp_path / "fs", tmp_path / "missing") is None


def test_unreadable_quota_is_reported_and_skipped(tmp_path, caplog):
    _write(tmp_path / "fs/cpu.max", "lots 100000")
    with caplog.at_level(logging.WARNING, logger="tokenmill.hardware"):
        assert hardware.cgroup_cpu_quota(tmp_path / "fs", tmp_path / "missing") is None
    assert "cpu.max" in caplog.text


@pytest.mark.parametrize("quota,expected", [(None, 8), (16.0, 8), (2.0, 2), (1.5, 1), (0.2, 1)])
def test_available_cpus_caps_affinity_by_quota(monkeypatch, quota, expected):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: quota)
    assert hardware.available_cpus() == expected


def test_resolve_threads_order(monkeypatch):
    """An explicit count wins, then OMP_NUM_THREADS (as torch read it at import), then the available CPUs."""
    monkeypatch.setattr(hardware, "available_cpus", lambda: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert hardware.resolve_threads(1) == 1
    assert hardware.resolve_threads(None) == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert hardware.resolve_threads(None) == 3
    with pytest.raises(ValueError, match="threads must be >= 1"):
        hardware.resolve_threads(0)


@pytest.mark.parametrize("bf16", [True, False])
def test_vllm_dtype_names(monkeypatch, caplog, bf16):
    """half/float16 take the 16-bit type the CPU computes natively (float32 without one), saying so."""
    monkeypatch.setattr(hardware, "has_native_bf16", lambda: bf16)
    assert hardware.resolve_dtype("float") == torch.float32
    with caplog.at_level(logging.WARNING, logger="tokenmill.hardware"):
        for name in ("half", "float16"):
            assert hardware.resolve_dtype(name) == (torch.bfloat16 if bf16 else torch.float32)
    assert "float16 is emulated" in caplog.text
    with pytest.raises(ValueError, match="'half'.*got 'fp8'"):
        hardware.resolve_dtype("fp8")
