"""The tokenizer cache: a GGUF's tokenizer as built once, read back at later starts.

Building a vocabulary from GGUF metadata is Python work over every token (and, for SentencePiece files, over
every split of every piece to find the merges): about a second and a half for Gemma 3's 262k pieces, most of
a warm start. The built tokenizer's JSON reloads in the tokenizers library's Rust code instead, with a
decode-only twin (decoder_json) that an engine core loads in place of the whole. An entry is keyed by the
file's path, size and modification time, the tokenizers version and FORMAT_VERSION, and carries a digest of its
contents; a changed file gets a new entry (the old one is removed), a damaged or unreadable one is rebuilt.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import tokenizers

from tokenmill.model.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill.model")

FORMAT_VERSION = 2  # bump when Tokenizer.dumps or a vocabulary builder changes what it makes


def cached(folder: Path, checkpoint: Path, build: Callable[[], Tokenizer], decode_only: bool = False) -> Tokenizer:
    """The tokenizer of `checkpoint` from `folder` (decode_only: as Tokenizer.loads), or `build()` written there
    for the next start."""
    stat = checkpoint.stat()
    name = str(checkpoint.resolve())
    key = hashlib.sha256(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{tokenizers.__version__}\0"
                         f"{FORMAT_VERSION}".encode()).hexdigest()[:24]
    path = folder / f"{key}.json"
    try:
        return _read(path, decode_only)
    except FileNotFoundError:
        pass
    except Exception as exc:  # damaged, bad JSON, missing facts, or the Rust parser's own plain Exception: rebuild
        logger.warning("tokenizer cache entry %s is unusable (%s); rebuilding it", path, exc)
    tokenizer = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".tmp") as out:
            text = tokenizer.dumps()  # first line: whose entry this is (for removing stale ones) and its digest
            out.write(f"{name}\n{_digest(text)}\n{text}")
        os.chmod(out.name, 0o644)
        os.replace(out.name, path)
        _remove_stale(folder, name, path)
    except OSError as exc:
        logger.warning("could not write the tokenizer cache under %s (%s); the next start builds it again",
                       folder, exc)
    return tokenizer


def _read(path: Path, decode_only: bool) -> Tokenizer:
    """The entry's tokenizer. Decode-only, its digest is checked first: the encoding backend is then only parsed
    when first used, so damage inside it would otherwise surface at a request (loaded whole, parsing checks it)."""
    _, digest, text = path.read_text(encoding="utf-8").split("\n", 2)
    if decode_only and _digest(text) != digest:
        raise ValueError("its digest does not match its contents")
    return Tokenizer.loads(text, decode_only)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _remove_stale(folder: Path, name: str, keep: Path) -> None:
    """Entries of the same file under another key (it changed since, or the tokenizers library did) and entries of
    files that are gone."""
    for entry in folder.glob("*.json"):
        if entry == keep:
            continue
        try:
            with entry.open(encoding="utf-8") as f:
                owner = f.readline().rstrip("\n")
        except (OSError, UnicodeDecodeError):
            continue
        if owner == name or not Path(owner).exists():
            entry.unlink(missing_ok=True)
