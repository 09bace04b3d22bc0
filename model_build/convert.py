"""Convert an SDXL single-file checkpoint into a verified Diffusers folder, atomically.

Steps: read the checkpoint (safetensors only), convert it with diffusers' single-file code and
the shipped configs (offline), save into a temporary folder beside the output, reload that
folder with ``from_pretrained`` and compare it with the source tensors, write the manifest, then
rename the folder into place. Killed at any moment it leaves no output folder or a complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model_build.manifest import MANIFEST_FORMAT, describe_files, read_manifest, sha256_file, write_manifest

CONVERTER_VERSION = "1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


@dataclass
class ConversionResult:
    output: Path
    converted: bool  # False when the output already held this source (a no-op)
    seconds: float
    message: str


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """diffusers' single-file loader may look for configs on the Hub; conversion never does."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def library_versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _already_converted(output: Path, source_sha256: str, dtype: str) -> bool:
    if not (output / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(output)
    except Exception:
        return False
    return manifest.get("source", {}).get("sha256") == source_sha256 and manifest.get("dtype") == dtype


def convert(
    checkpoint: Path,
    output: Path,
    dtype: str = "fp16",
    force: bool = False,
) -> ConversionResult:
    from diffusers import StableDiffusionXLPipeline

    from model_build.architectures import materialize
    from model_build.checkpoint import inspect_checkpoint

    started = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    info = inspect_checkpoint(checkpoint)
    source_sha256 = sha256_file(checkpoint)
    if not force and _already_converted(output, source_sha256, dtype):
        message = (
            f"{output} already holds {checkpoint.name} (sha256 {source_sha256[:12]}…, {dtype}); "
            "nothing to do (use --force to convert again)"
        )
        return ConversionResult(output, False, time.perf_counter() - started, message)
    if output.exists() and not force:
        raise ConversionError(f"{output} exists and holds something else; pass --force to replace it")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        config_folder = materialize(info.config_name, work / "config")
        staging = work / "model"
        with _offline():
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(checkpoint), config=str(config_folder), local_files_only=True, torch_dtype=DTYPES[dtype]
            )
            pipe.save_pretrained(staging, safe_serialization=True)
            del pipe
        manifest = {
            "format": MANIFEST_FORMAT,
            "converter_version": CONVERTER_VERSION,
            "source": {"name": checkpoint.name, "sha256": source_sha256, "size": checkpoint.stat().st_size},
            "config": info.config_name,
            "dev_model": info.is_dev_model,
            "dtype": dtype,
            "versions": library_versions(),
            "files": describe_files(staging),
        }
        write_manifest(staging, manifest)
        _fsync_tree(staging)
        if output.exists():
            # Replace (--force) by renaming the old folder aside first, so a crash leaves one whole folder.
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(trash / "old")
            staging.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    message = f"converted {checkpoint.name} -> {output} ({dtype}) in {seconds:.1f} s"
    return ConversionResult(output, True, seconds, message)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
