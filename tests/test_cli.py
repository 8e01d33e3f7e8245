"""The `tokenmill` command, run as a user runs it: a separate process, output read from its stdout/stderr."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from gguf_files import write_small_gguf


def _tokenmill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, timeout=timeout)


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
    proc = _tokenmill("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0", "--dtype", "float32")
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


@pytest.mark.parametrize("option,value,field", [("--temperature", "-1", "temperature"), ("--max-tokens", "0", "max_tokens")])
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
