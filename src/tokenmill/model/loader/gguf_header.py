"""A fast GGUF header reader: key/values and the tensor table, never the tensor data.

gguf-py's GGUFReader builds a numpy view per array item, which takes tens of seconds on a 262k-token
vocabulary; this walks the same bytes with `struct` and reads numeric arrays in one `np.frombuffer`. It only
needs the header bytes, so it also reads the first chunk of a model shipped in parts (see catalog.py).
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent

# GGUF value types 0..12 (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; `shape` in torch order (outermost first), `offset` from the data start."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block_size * type_size


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data. `data_offset` is where the data section starts in the file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int

    @property
    def alignment(self) -> int:
        return int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end: a complete file is at least this long."""
        return self.data_offset + max((t.offset + t.nbytes for t in self.tensors), default=0)

    def expected_file_size(self) -> range:
        """Sizes a complete file can have: the data end, plus at most the writer's padding to alignment."""
        end = self.data_end
        return range(end, -(-end // self.alignment) * self.alignment + 1)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse the header of `path`; a file cut short after its header (a first chunk) reads fine."""
    path = Path(path)
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(path, buffer)
    except (OSError, ValueError) as exc:  # mmap of an empty file raises ValueError
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc


def _parse(path: Path, buffer: mmap.mmap) -> GGUFHeader:
    if buffer[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    cursor = _Cursor(buffer, path)
    cursor.position = 4
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path} is GGUF version {version}; tokenmill reads versions 2 and 3")
    tensor_count, kv_count = cursor.scalar("Q"), cursor.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    tensors = tuple(_tensor_info(cursor) for _ in range(tensor_count))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_offset = -(-cursor.position // alignment) * alignment
    return GGUFHeader(path, version, metadata, tensors, data_offset)


def _tensor_info(cursor: _Cursor) -> TensorInfo:
    name = cursor.string()
    dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]
    raw_type = cursor.scalar("I")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ModelLoadError(f"{cursor.path}: tensor {name!r} has unknown ggml type {raw_type}") from None
    return TensorInfo(name, tuple(reversed(dims)), qtype, cursor.scalar("Q"))


class StringArray(Sequence[str]):
    """A header's string array, kept as its raw bytes (8-byte length, then UTF-8, per item) until first read."""

    def __init__(self, raw: bytes, count: int, path: Path, offset: int) -> None:
        self._raw, self._count, self._path, self._offset = raw, count, path, offset
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # an int or a slice, as a list takes them
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:  # as a list compares: item by item, with any sequence of strings
        return isinstance(other, Sequence) and not isinstance(other, str) and self._decoded() == list(other)

    __hash__ = None  # mutable-looking, as a list

    def _decoded(self) -> list[str]:
        if self._items is None:
            raw, position, unpack, items = self._raw, 0, _U64.unpack_from, []
            try:
                for _ in range(self._count):
                    (length,) = unpack(raw, position)
                    position += 8
                    items.append(raw[position : position + length].decode("utf-8"))
                    position += length
            except UnicodeDecodeError as exc:
                raise ModelLoadError(f"{self._path}: a header string near byte {self._offset + position} is not "
                                     "UTF-8") from exc
            self._items = items
        return self._items


class _Cursor:
    """Reads little-endian values from the header, advancing `position`; running off the end is a clear error."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.path = path
        self.position = 0

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.position)
        self.position += size
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        self._need(length)
        raw = self.buffer[self.position : self.position + length]
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{self.path}: a header string at byte {self.position - length} is not UTF-8") from exc

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR_FORMATS:
                dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
                self._need(count * dtype.itemsize)
                items = np.frombuffer(self.buffer, dtype, count, self.position)
                self.position += count * dtype.itemsize
                return items.tolist()
            if item_type == _STRING:
                return self._strings(count)
            return [self.value(item_type) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {value_type} at byte {self.position}")

    def _strings(self, count: int) -> StringArray:
        """An array of strings (a vocabulary, merges): only walked here, decoded when first read. The walk is the
        hot loop of the whole header, so kept tight; most starts never read these (the tokenizer is cached)."""
        buffer, start, unpack = self.buffer, self.position, _U64.unpack_from
        position = start
        try:
            for _ in range(count):
                position += 8 + unpack(buffer, position)[0]
        except struct.error:
            position = len(buffer) + 1  # the length prefix ran off the end: reported just below
        if position > len(buffer):
            raise ModelLoadError(f"{self.path} ends inside its GGUF header (truncated or not a GGUF file)")
        self.position = position
        return StringArray(buffer[start:position], count, self.path, start)

    def _need(self, size: int) -> None:
        if self.position + size > len(self.buffer):
            raise ModelLoadError(f"{self.path} ends inside its GGUF header (truncated or not a GGUF file)")
