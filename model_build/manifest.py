"""``manifest.json``: what a converted model folder holds, and the check that it still does.

The converter writes it last, just before the folder is renamed into place; the worker and the
batch runner call :func:`verify` at start-up and refuse a folder that does not match it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files that from_pretrained may read: an unlisted one in a model folder is reported by verify.
LOADABLE_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json"})


class ModelFolderError(Exception):
    """A converted model folder is missing, incomplete or altered. The message says what to run."""


def sha256_file(path: Path, chunk_size: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest itself."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        files[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    fix = f"convert a checkpoint into it: python -m model_build convert CHECKPOINT.safetensors --output {folder}"
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; {fix}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(f"model folder {folder} has no {MANIFEST_NAME} (not made by model_build); {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path} is not readable JSON ({error}); {fix} --force") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise ModelFolderError(f"{path} is not a model_build manifest of format {MANIFEST_FORMAT}; {fix} --force")
    return manifest


def manifest_hash(folder: Path) -> str:
    """A short identity of the converted model, reported in every job's metadata."""
    return sha256_file(Path(folder) / MANIFEST_NAME)[:16]


def verify(folder: Path, full: bool = False) -> dict[str, Any]:
    """Check ``folder`` against its manifest: sizes always, sha256 of every file with ``full``.

    Returns the manifest; raises :class:`ModelFolderError` naming the first problems.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{relative} has {path.stat().st_size} bytes, manifest says {expected['size']}")
        elif full and sha256_file(path) != expected["sha256"]:
            problems.append(f"{relative} sha256 differs from the manifest (file altered or corrupt)")
    # A weight or config file that the manifest does not list could be picked up by from_pretrained.
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative not in listed and path.suffix.lower() in LOADABLE_SUFFIXES:
            problems.append(f"{relative} is not in the manifest (added after conversion)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        source = manifest.get("source", {}).get("name", "the checkpoint")
        raise ModelFolderError(
            f"model folder {folder} does not match its manifest: {shown}. "
            f"Convert again: python -m model_build convert {source} --output {folder} --force"
        )
    return manifest
