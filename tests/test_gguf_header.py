"""The fast GGUF header reader against gguf-py's GGUFReader, and its errors on damaged files."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from gguf_files import TOKENS, write_small_gguf
from tokenmill.errors import ModelLoadError
from tokenmill.model.loader.gguf_header import read_gguf_header


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def _assert_same_as_gguf_py(path: Path) -> None:
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert header.metadata == expected
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert ours.qtype == theirs.tensor_type
        assert ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert header.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes
    assert path.stat().st_size in header.expected_file_size()


def test_matches_gguf_py_on_small_file(small_gguf: Path) -> None:
    _assert_same_as_gguf_py(small_gguf)
    assert read_gguf_header(small_gguf).metadata["tokenizer.ggml.tokens"] == TOKENS


def test_matches_gguf_py_on_default_model(gguf_path: Path) -> None:
    _assert_same_as_gguf_py(gguf_path)


def test_header_only_prefix_reads(small_gguf: Path, tmp_path: Path) -> None:
    """A first chunk (header plus some data) describes the whole file."""
    whole = read_gguf_header(small_gguf)
    prefix = tmp_path / "part1.bin"
    prefix.write_bytes(small_gguf.read_bytes()[: whole.data_offset + 10])
    head = read_gguf_header(prefix)
    assert head.metadata == whole.metadata and head.tensors == whole.tensors
    assert head.data_end == whole.data_end == small_gguf.stat().st_size


@pytest.mark.parametrize("cut", [3, 20, 200])
def test_truncated_header_is_a_clear_error(small_gguf: Path, tmp_path: Path, cut: int) -> None:
    broken = tmp_path / "cut.gguf"
    broken.write_bytes(small_gguf.read_bytes()[:cut])
    with pytest.raises(ModelLoadError, match="truncated|not a GGUF"):
        read_gguf_header(broken)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf at all"])
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=str(path)):
        read_gguf_header(path)


def test_string_arrays_decode_when_read(small_gguf: Path, tmp_path: Path) -> None:
    """A vocabulary is walked, not decoded, by the header read (most starts never need it); a bad string in it is a
    clear error when the array is read."""
    data = bytearray(small_gguf.read_bytes())
    token = TOKENS[-1].encode()
    at = data.index(len(token).to_bytes(8, "little") + token) + 8
    data[at] = 0xFF  # no UTF-8 sequence starts with this byte
    broken = tmp_path / "bad_token.gguf"
    broken.write_bytes(bytes(data))
    tokens = read_gguf_header(broken).metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == len(TOKENS)
    with pytest.raises(ModelLoadError, match="not UTF-8"):
        tokens[0]
