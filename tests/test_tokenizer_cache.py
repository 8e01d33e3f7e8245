"""The tokenizer cache: a GGUF's tokenizer read back from its entry encodes and decodes as the built one (the
decode-only twin it loads first included); a changed file makes a new entry (the old one removed); a damaged entry
is rebuilt, never loaded."""
from __future__ import annotations

import logging
import os
import random
import shutil

import pytest

from gguf_files import write_small_gguf
from tokenizer_texts import SENTENCEPIECE_TEXTS, TEXTS
from tokenmill.model.loader.gguf_header import read_gguf_header
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.model.tokenizer import cache as tokenizer_cache


@pytest.fixture
def gguf(tmp_path, gguf_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, copy)
    return copy


def _build(path, calls):
    def build():
        calls.append(path)
        return Tokenizer.from_gguf_metadata(read_gguf_header(path).metadata)
    return build


def test_cached_tokenizer_equals_the_built_one(gguf, tmp_path):
    folder, calls = tmp_path / "tokenizers", []
    built = tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    loaded = tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    assert len(calls) == 1  # the second start read the entry
    for text in TEXTS + SENTENCEPIECE_TEXTS:
        ids = built.encode(text)
        assert loaded.encode(text) == ids, text
        assert loaded.decode(ids) == built.decode(ids)
    for fact in ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos", "chat_template", "stop_token_ids",
                 "vocab_size"):
        assert getattr(loaded, fact) == getattr(built, fact), fact


def test_changed_file_makes_a_new_entry(gguf, tmp_path):
    folder, calls = tmp_path / "tokenizers", []
    tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    before = sorted(folder.iterdir())
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    after = sorted(folder.iterdir())
    assert len(calls) == 2 and len(after) == 1 and after != before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "inside"])
def test_damaged_entry_is_rebuilt(gguf, tmp_path, caplog, damage):
    folder, calls = tmp_path / "tokenizers", []
    built = tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    entry = next(folder.iterdir())
    text = entry.read_text(encoding="utf-8")
    damaged = {"truncate": text[: len(text) // 2], "garbage": text.replace('"add_bos"', '"add_b0s"', 1),
               "inside": text.replace("vocab", "vocob", 1)}[damage]  # "inside": the lazily parsed backend's JSON
    entry.write_text(damaged, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tokenmill.model"):
        rebuilt = tokenizer_cache.cached(folder, gguf, _build(gguf, calls), decode_only=True)
    assert len(calls) == 2 and "unusable" in caplog.text
    assert rebuilt.encode(TEXTS[0]) == built.encode(TEXTS[0])
    tokenizer_cache.cached(folder, gguf, _build(gguf, calls))
    assert len(calls) == 2  # and good again


def test_unwritable_cache_still_loads(gguf, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="tokenmill.model"):
        tokenizer = tokenizer_cache.cached(blocker / "tokenizers", gguf, _build(gguf, []))
    assert tokenizer.encode(TEXTS[0]) and "could not write" in caplog.text


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_loaded_tokenizer_decodes_as_the_built_one_without_parsing_the_encoder(gguf, tmp_path, kind):
    """decode_only loads an entry's decode-only twin (what an engine core needs); it decodes every id, alone and in
    sequences, exactly as the whole tokenizer, and the encoder is parsed at the first encode."""
    path = gguf if kind == "byte-level" else write_small_gguf(tmp_path / "sentencepiece.gguf")
    folder = tmp_path / "tokenizers"
    built = tokenizer_cache.cached(folder, path, _build(path, []))
    loaded = tokenizer_cache.cached(folder, path, _build(path, []), decode_only=True)
    assert "_backend" not in vars(loaded)
    ids = list(range(built.vocab_size))
    rng = random.Random(0)
    for sequence in [ids, *[rng.choices(ids, k=48) for _ in range(200)]]:
        for skip in (True, False):
            assert loaded.decode(sequence, skip) == built.decode(sequence, skip)
    assert loaded.convert_ids_to_tokens(ids) == built.convert_ids_to_tokens(ids)
    assert loaded.backend_json() == built.backend_json() and "_backend" not in vars(loaded)
    assert loaded.encode(TEXTS[0]) == built.encode(TEXTS[0]) and "_backend" in vars(loaded)


def test_entries_of_deleted_files_are_removed(gguf, tmp_path):
    folder = tmp_path / "tokenizers"
    tokenizer_cache.cached(folder, gguf, _build(gguf, []))
    other = shutil.copyfile(gguf, tmp_path / "other.gguf")
    gguf.unlink()
    tokenizer_cache.cached(folder, other, _build(other, []))
    entries = list(folder.iterdir())
    assert len(entries) == 1 and entries[0].read_text(encoding="utf-8").startswith(str(other.resolve()))
