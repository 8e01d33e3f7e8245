"""The repacked-weight cache: a second start maps the weights the first one wrote, bit for bit; a changed file or
kernel layout makes a new entry (and removes the old); a corrupt entry is rebuilt, never loaded."""
from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import torch

from tokenmill.config import QuantConfig
from tokenmill.model import weight_cache
from tokenmill.model.build import build_model
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.loader.checkpoint import load_checkpoint

NATIVE = QuantConfig("native")


@pytest.fixture
def gguf(tmp_path, gguf_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, copy)
    return copy


def _packed(model) -> dict[str, list[torch.Tensor]]:
    return {name: [t for p in m.parts for t in (p.weight.qweight, p.weight.scales, p.weight.mins) if t is not None]
            for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _build(path, folder):
    return build_model(load_checkpoint(path), torch.float32, NATIVE, weight_cache=folder)


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_second_start_maps_the_same_weights(gguf, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    first = _build(gguf, folder)
    assert len(_entries(folder)) == 2  # data + index
    calls = []
    monkeypatch.setattr(weight_cache, "save", lambda *a: calls.append(a))  # a hit must not write again
    monkeypatch.setattr(weight_cache.zlib, "crc32", lambda *a: calls.append(a))  # nor read it all: stat unchanged
    second = _build(gguf, folder)
    assert not calls
    monkeypatch.undo()
    a, b = _packed(first), _packed(second)
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True)), name
    x = torch.randn(3, second.config.hidden_size)
    layer = second.layers[0].mlp.gate_up_proj
    assert torch.equal(layer(x), first.layers[0].mlp.gate_up_proj(x))


def test_changed_file_or_layout_makes_a_new_entry(gguf, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    _build(gguf, folder)
    before = _entries(folder)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: perhaps rewritten
    _build(gguf, folder)
    touched = _entries(folder)
    assert len(touched) == 2 and touched != before  # the old entry is gone, a new one written
    monkeypatch.setattr(weight_cache, "LAYOUT_VERSION", weight_cache.LAYOUT_VERSION + 1)
    _build(gguf, folder)
    assert len(_entries(folder)) == 2 and _entries(folder) != touched


@pytest.mark.parametrize("damage", ["flip", "flip_keep_mtime", "truncate", "index"])
def test_corrupt_entry_is_rebuilt_not_loaded(gguf, tmp_path, caplog, damage):
    folder = tmp_path / "weights"
    expected = _packed(_build(gguf, folder))
    data = next(folder.glob("*.bin"))
    time.sleep(0.05)  # the file system's clock is coarse: let the damage's mtime differ from the written one
    if damage.startswith("flip"):
        before = data.stat()
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        if damage == "flip_keep_mtime":  # as a copy that keeps times would; ctime still moves
            os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size - 100)
    else:
        next(folder.glob("*.json")).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="tokenmill.model"):
        rebuilt = _packed(_build(gguf, folder))
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    for name in expected:
        assert all(torch.equal(x, y) for x, y in zip(expected[name], rebuilt[name], strict=True)), name
    assert weight_cache.load(folder, gguf, next(iter(_index_formats(folder)))) is not None  # and now good again


def _index_formats(folder):
    import json

    return {json.loads(p.read_text())["format"] for p in folder.glob("*.json")}


def test_entries_of_deleted_checkpoints_are_removed(gguf, tmp_path):
    """A model file that is gone leaves no gigabytes behind: the next entry written removes its entries."""
    folder = tmp_path / "weights"
    _build(gguf, folder)
    other = shutil.copyfile(gguf, tmp_path / "other.gguf")
    gguf.unlink()
    _build(other, folder)
    entries = _entries(folder)
    indexes = [(folder / e).read_text() for e in entries if e.endswith(".json")]
    assert len(entries) == 2 and all(str(other.resolve()) in index for index in indexes)
