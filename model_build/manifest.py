"""``manifest.json``: what a converted model folder holds, and the check that it still does.

The converter writes it last, just before the folder is renamed into place; the worker and the
batch runner call :func:`verify` at start-up and refuse a folder that does not match it.

:class:`Manifest` is the one typed form of the file: every module that reads a converted folder's
facts (the converter's up-to-date check, the worker's model location and loading, the metadata)
reads these fields, never the JSON's keys. The file on disk is unchanged by this typing: a field
is written only when it was set (pydantic's ``exclude_unset``), so a manifest read from disk is
written back byte for byte, including those of older converters that lack a field (``family``
before refiners converted, ``prediction`` before v-prediction did). Keys this version does not
know are kept, not dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import ModelFolderError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Recorded in every manifest: a folder made by another converter version is converted again. Bumped only when
# the converted files themselves change (a bump makes every worker reconvert its model on its next start).
CONVERTER_VERSION = "2"
# Files that from_pretrained may read: an unlisted one in a model folder is reported by verify.
LOADABLE_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json"})

PredictionType = Literal["epsilon", "v_prediction"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class FileRecord(_Record):
    sha256: str
    size: int


class SourceRecord(_Record):
    """The checkpoint (or --vae file) a folder was converted from."""

    name: str  # as the user named it: a path's file name, the hf:// URI, the URL without its query string
    sha256: str
    size: int
    file: str | None = None
    mtime_ns: int | None = None


class VaeRecord(SourceRecord):
    layout: str | None = None  # how the --vae file named its tensors
    ignored: tuple[str, ...] = ()


class ReplacedTensors(_Record):
    count: int
    by: str  # "--vae"


class Prediction(_Record):
    """What the UNet predicts and on which noise schedule; written into the scheduler config too."""

    prediction_type: PredictionType = "epsilon"
    zero_terminal_snr: bool = False  # betas rescaled to zero terminal SNR, trailing timesteps
    decided_by: Literal["markers", "option", "default"] = "default"
    markers: tuple[str, ...] = ()  # the checkpoint's marker keys (v_pred, ztsnr), whatever decided


DEFAULT_PREDICTION = Prediction()


class Manifest(_Record):
    """``manifest.json`` as fields. Only ``format`` and ``files`` are required (bench writes a short one)."""

    format: Literal[1]
    files: dict[str, FileRecord]
    converter_version: str | None = None
    source: SourceRecord | None = None
    vae: VaeRecord | None = None
    config: str | None = None  # the shipped config the checkpoint matched, e.g. sdxl_base
    family: str | None = None  # sdxl-base, sdxl-refiner, sdxl-inpaint; absent (before refiners): a base
    dev_model: bool = False
    notice: str | None = None
    dtype: str | None = None
    source_dtypes: tuple[str, ...] | None = None
    tensors: dict[str, int] | None = None  # per component: tensors proven equal to the checkpoint's
    ignored_tensors: tuple[str, ...] | None = None
    replaced_tensors: ReplacedTensors | None = None
    prediction: Prediction | None = None  # absent (before v-prediction converted): epsilon
    versions: dict[str, str] | None = None

    @property
    def effective_prediction(self) -> Prediction:
        return self.prediction or DEFAULT_PREDICTION

    @property
    def source_name(self) -> str:
        return self.source.name if self.source else "the checkpoint"

    def file_sha256(self, relative: str) -> str | None:
        entry = self.files.get(relative)
        return entry.sha256 if entry else None

    def to_json(self) -> str:
        fields = self.model_dump(mode="json", exclude_unset=True)
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, chunk_size: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, FileRecord]:
    """sha256 and size of every file under ``folder`` except the manifest itself."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        files[relative] = FileRecord(sha256=sha256_file(path), size=path.stat().st_size)
    return files


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def parse_manifest(text: str) -> Manifest:
    """A manifest from its JSON text; raises ``ValueError`` (json's or pydantic's) when it is not one."""
    return Manifest.model_validate_json(text)


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    fix = f"convert a checkpoint into it: python -m model_build convert CHECKPOINT.safetensors --output {folder}"
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; {fix}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(f"model folder {folder} has no {MANIFEST_NAME} (not made by model_build); {fix}")
    try:
        text = path.read_text()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path} is not readable JSON ({error}); {fix} --force") from error
    try:
        return parse_manifest(text)
    except ValidationError as error:
        raise ModelFolderError(
            f"{path} is not a model_build manifest of format {MANIFEST_FORMAT} "
            f"({error.error_count()} problems, first: {_first_problem(error)}); {fix} --force"
        ) from None


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the file"
    return f"{where}: {first['msg']}"


def manifest_hash(folder: Path) -> str:
    """A short identity of the converted model, reported in every job's metadata."""
    return sha256_file(Path(folder) / MANIFEST_NAME)[:16]


def verify(folder: Path, full: bool = False) -> Manifest:
    """Check ``folder`` against its manifest: sizes always, sha256 of every file with ``full``.

    Returns the manifest; raises :class:`ModelFolderError` naming the first problems.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for relative, expected in manifest.files.items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != expected.size:
            problems.append(f"{relative} has {path.stat().st_size} bytes, manifest says {expected.size}")
        elif full and sha256_file(path) != expected.sha256:
            problems.append(f"{relative} sha256 differs from the manifest (file altered or corrupt)")
    # A weight or config file that the manifest does not list could be picked up by from_pretrained.
    listed = set(manifest.files) | {MANIFEST_NAME}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative not in listed and path.suffix.lower() in LOADABLE_SUFFIXES:
            problems.append(f"{relative} is not in the manifest (added after conversion)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ModelFolderError(
            f"model folder {folder} does not match its manifest: {shown}. "
            f"Convert again: python -m model_build convert {manifest.source_name} --output {folder} --force"
        )
    return manifest
