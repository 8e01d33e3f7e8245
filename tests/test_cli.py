"""The `tokenmill` command, run as a user runs it: a separate process, output read from its stdout/stderr."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest


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
