"""The `tokenmill` command, run as a user runs it: a separate process, output read from its stdout/stderr."""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import socket
import subprocess
import sys

import pytest

from gguf_files import write_small_gguf
from tokenmill.cli import build_parser
from tokenmill.engine_args import EngineArgs, parse_memory


def _tokenmill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_default_model():
    proc = _tokenmill("info")
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in proc.stdout.splitlines() if line.strip())
    assert rows["architecture"] == "llama"
    assert rows["layers"] == "30"
    assert rows["format"] == "gguf"
    assert rows["vocab"] == "49152"
    assert re.search(r"\bQ4_1 x\d+", rows["tensor types"])
    assert rows["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_generate_greedy():
    proc = _tokenmill("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
                      "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["generate", "hello", "--model"], ["info"]])
def test_unknown_model_path_is_a_clean_error(tmp_path, command):
    missing = str(tmp_path / "no-such-model.gguf")
    proc = _tokenmill(*command, missing)
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("option,value,field",
                         [("--temperature", "-1", "temperature"), ("--max-tokens", "0", "max_tokens")])
def test_bad_sampling_option_is_a_clean_error_before_loading(option, value, field):
    """Checked before the model loads: the message comes at once (a load takes seconds), without a traceback."""
    proc = _tokenmill("generate", "hello", option, value, "--model", "/model/that/is/never/opened.gguf", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {field} ")
    assert "never/opened" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_lists_packaged_and_local(tmp_path):
    write_small_gguf(tmp_path / "tiny-q8_0.gguf", context=2048)
    proc = _tokenmill("models", "--models-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert rows["smollm2-135m"][1:3] == ["llama", "Q4_1"] and "8192" in rows["smollm2-135m"]
    assert rows["tiny-q8_0"][1:3] == ["llama", "Q8_0"] and rows["tiny-q8_0"][-2:] == ["models", "dir"]
    assert {"gemma3-270m", "qwen2.5-coder-1.5b"} <= rows.keys()
    assert f"models dir: {tmp_path}" in proc.stdout


def test_info_resolves_short_name():
    proc = _tokenmill("info", "smollm2-135m")
    assert proc.returncode == 0, proc.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stdout


def test_help_and_parser_do_not_import_torch():
    """Importing torch takes seconds: `tokenmill --help` must not wait for it."""
    code = ("import sys; from tokenmill.cli import build_parser; build_parser().parse_args(['serve', '--port', '1']); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert _tokenmill("serve", "--help", timeout=60).returncode == 0


def test_version():
    proc = _tokenmill("--version", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tokenmill {importlib.metadata.version('tokenmill')}"


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["chat"], ["bench", "offline"],
                                     ["bench", "latency"]])
def test_engine_flags_default_to_engine_args_defaults(command):
    """Each command's engine flags are EngineArgs' fields with its defaults, so `LLM()` and the CLI agree."""
    assert EngineArgs.from_cli_args(build_parser().parse_args(command)) == EngineArgs()


def test_engine_flags_reach_engine_args():
    args = build_parser().parse_args(["serve", "--model", "m.gguf", "--kv-cache-memory", "1GiB", "-q", "int4",
                                      "--no-enable-prefix-caching", "--threads", "1"])
    assert EngineArgs.from_cli_args(args, model="other.gguf") == EngineArgs(
        model="other.gguf", quantization="int4", kv_cache_memory=2**30, enable_prefix_caching=False, threads=1)


@pytest.mark.parametrize("text,expected", [("4GiB", 4 * 2**30), ("4gb", 4 * 10**9), ("4G", 4 * 10**9),
                                           ("512 MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("1073741824", 2**30),
                                           ("2e9", 2 * 10**9), ("0.5", 0.5), ("1", 1.0), ("64KB", 64000)])
def test_kv_cache_memory_units_and_fractions(text, expected):
    value = parse_memory(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["1.5", "0", "-1", "4XB", "abc", "nan", "1e400"])
def test_kv_cache_memory_rejects_ambiguous_or_invalid(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory(text)


def test_kv_cache_memory_fraction_above_one_is_a_clean_error():
    proc = _tokenmill("generate", "hello", "--kv-cache-memory", "1.5", "--model", "/never/opened.gguf", timeout=60)
    assert proc.returncode == 2
    assert "--kv-cache-memory" in proc.stderr and "'1.5' is neither a fraction" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_reported_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _tokenmill("serve", "--port", str(port), "--model", "/never/opened.gguf", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "never/opened" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("cxx,message", [("/nonexistent/g++", "CXX=/nonexistent/g++ is not an executable"),
                                         ("false", "`false --version` failed")])
def test_broken_cxx_is_a_kernel_build_error(monkeypatch, cxx, message):
    """Callers fall back to plain PyTorch on KernelBuildError; anything else would be a traceback at load."""
    from tokenmill.kernels.build import KernelBuildError, _compiler

    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(KernelBuildError, match=re.escape(message)):
        _compiler()
