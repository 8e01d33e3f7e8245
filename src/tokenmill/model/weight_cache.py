"""The repacked-weight cache: a model's packed matrices, as the kernels read them, mapped from disk at start.

Repacking a GGUF's k-quant blocks into the kernels' tiled layout is most of a start (seconds for a 1.5B model);
the result depends only on the file, the weight format asked for and the kernels' layout. So the first start
writes it to `$TOKENMILL_CACHE_DIR/weights/` and later ones map it (copy-on-write: pages are read as the kernels
touch them and shared with the page cache, never copied into this process).

An entry is a data file (the tensors back to back, 64-byte aligned) and a JSON index naming each tensor's offset,
dtype and shape, with the CRC-32 of the data and the data file's stat as written. The key hashes the checkpoint's
path, size and modification time with the format and LAYOUT_VERSION: a changed file or kernel layout is a new key
(old entries are removed). The checksum is computed again only when the data file's stat differs from the one
written (it was copied, edited, truncated, touched): reading a gigabyte to check it would be most of a start, and
the whole of a cold one. An entry that does not check out (missing, truncated, wrong checksum) is rebuilt, never
loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zlib
from pathlib import Path

import torch

from tokenmill.quant.weights import QuantizedWeight

logger = logging.getLogger("tokenmill.model")

LAYOUT_VERSION = 2  # bump when QuantizedWeight's fields or the tiled layout change
_ALIGN = 64
_DTYPES = {str(d): d for d in (torch.uint8, torch.int8, torch.float16, torch.float32)}
Packed = dict[str, list[QuantizedWeight]]  # model parameter -> its packed parts


def cache_key(checkpoint: Path, fmt: str) -> str:
    """Names the entry for this file (its path, size, mtime), weight format and layout."""
    stat = checkpoint.stat()
    text = f"{checkpoint.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{fmt}\0{LAYOUT_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load(folder: Path, checkpoint: Path, fmt: str) -> Packed | None:
    """The cached weights of `checkpoint` in format `fmt`, mapped from disk; None when there is no good entry."""
    key = cache_key(checkpoint, fmt)
    index_path, data_path = folder / f"{key}.json", folder / f"{key}.bin"
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        size = data_path.stat().st_size
        if size != index["size"]:
            raise ValueError(f"data is {size} bytes, the index says {index['size']}")
        data = torch.from_file(str(data_path), shared=False, size=size, dtype=torch.uint8)
        if _stat(data_path) != index.get("stat") and zlib.crc32(data.numpy()) != index["crc32"]:
            raise ValueError("checksum mismatch")
        return {name: [_weight(data, part) for part in parts] for name, parts in index["weights"].items()}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        logger.warning("weight cache entry %s is unusable (%s); rebuilding it", key, exc)
        return None


def save(folder: Path, checkpoint: Path, fmt: str, weights: Packed) -> None:
    """Write the entry atomically (a reader never sees half of one) and drop this checkpoint's older entries."""
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(checkpoint, fmt)
    index: dict = {"checkpoint": str(checkpoint.resolve()), "format": fmt, "layout": LAYOUT_VERSION, "weights": {}}
    crc, offset = 0, 0
    with tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".bin.tmp") as out:
        for name, parts in weights.items():
            entries = []
            for w in parts:
                entry = {"bits": w.bits, "group_size": w.group_size, "tiled": w.tiled, "kquant": w.kquant}
                for field, tensor in w.tensors().items():
                    pad = b"\0" * (-offset % _ALIGN)
                    raw = tensor.contiguous().view(torch.uint8).numpy()
                    out.write(pad)
                    out.write(raw)
                    crc = zlib.crc32(raw, zlib.crc32(pad, crc))
                    offset += len(pad)
                    entry[field] = {"offset": offset, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
                    offset += raw.nbytes
                entries.append(entry)
            index["weights"][name] = entries
    os.chmod(out.name, 0o644)  # as the other cache files: readable by whoever shares the cache
    os.replace(out.name, folder / f"{key}.bin")
    index.update(size=offset, crc32=crc, stat=_stat(folder / f"{key}.bin"))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".json.tmp") as index_out:
        json.dump(index, index_out)
    os.chmod(index_out.name, 0o644)
    os.replace(index_out.name, folder / f"{key}.json")  # last: an index names only complete data
    _remove_stale(folder, checkpoint, fmt, key)


def _stat(path: Path) -> list[int]:
    """What changes when a file is written, truncated, replaced or touched (ctime moves even under os.utime)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _weight(data: torch.Tensor, part: dict) -> QuantizedWeight:
    def tensor(spec: dict) -> torch.Tensor:
        dtype = _DTYPES[spec["dtype"]]
        count = math.prod(spec["shape"]) * dtype.itemsize
        return data[spec["offset"]:spec["offset"] + count].view(dtype).view(spec["shape"])

    tensors = {field: tensor(spec) for field, spec in part.items() if isinstance(spec, dict)}
    return QuantizedWeight(part["bits"], group_size=part["group_size"], tiled=part["tiled"], kquant=part["kquant"],
                           **{"mins": None, **tensors})


def _remove_stale(folder: Path, checkpoint: Path, fmt: str, keep: str) -> None:
    """Entries of the same checkpoint and format under another key (the file or the layout changed since), and
    entries of checkpoints that are gone."""
    for index_path in folder.glob("*.json"):
        if index_path.stem == keep:
            continue
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            continue
        owner = index.get("checkpoint")
        if (owner == str(checkpoint.resolve()) and index.get("format") == fmt) or not Path(str(owner)).exists():
            index_path.unlink(missing_ok=True)
            index_path.with_suffix(".bin").unlink(missing_ok=True)
