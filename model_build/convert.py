"""Convert an SDXL single-file checkpoint into a verified Diffusers folder, atomically.

Steps, each in its own module:

1. inspect (checkpoint.py): refuse pickles, truncated or corrupt files and non-SDXL checkpoints,
   choose the shipped config by shape, and account for every tensor by name and shape;
2. convert (single_file.py): one component at a time, streamed from the file with NaN/Inf checks
   and cast to the target dtype, through diffusers' single-file code with the shipped config
   folder as ``config=`` and the Hub off; each component is saved as safetensors into a temporary
   folder beside the output and freed before the next one (the UNet alone is 5 GB in fp16);
3. prove (completeness.py): reload the folder with ``from_pretrained`` and compare every tensor of
   every component with the checkpoint's, by name, exactly;
4. record (manifest.py): sha256 and size of every file, the source, versions, what the UNet
   predicts (prediction.py: the checkpoint's v_pred/ztsnr markers or --prediction-type, also
   written into the scheduler config); then rename the folder into place.

Killed at any moment it leaves no output folder or a complete one: the output only ever appears by
a rename of a finished, proven and fsynced folder (:mod:`.output_folder`: the lock that makes
several workers starting at once convert once, leftovers of killed runs, full or read-only disks).
An output that already holds this conversion is left alone (:mod:`.output_state`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from model_build.checkpoint import CheckpointInfo, inspect_checkpoint
from model_build.checkpoint_file import TensorReader, check_file_format, read_header
from model_build.errors import ConversionError
from model_build.manifest import (
    CONVERTER_VERSION,
    MANIFEST_FORMAT,
    Manifest,
    Prediction,
    ReplacedTensors,
    describe_files,
    write_manifest,
)
from model_build.output_folder import (
    check_output_location,
    conversion_lock,
    fsync_dir,
    fsync_tree,
    raise_output_problem,
    remove_leftovers,
    remove_leftovers_if_idle,
)
from model_build.output_state import FileIdentity, output_state
from model_build.prediction import decide_prediction, describe, scheduler_overrides
from model_build.tensor_checks import check_cast, read_tensors
from model_build.vae_file import VaeFile, load_vae_file

__all__ = [
    "CONVERTER_VERSION",
    "DTYPES",
    "ConversionError",
    "ConversionResult",
    "convert",
    "ensure_converted",
    "library_versions",
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Smallest first, so a damaged tensor is usually found before the 5 GB UNet is read.
COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "vae", "unet")


def _components_of(info: CheckpointInfo) -> tuple[str, ...]:
    """The checkpoint family's components in COMPONENT_ORDER (a refiner has no text_encoder)."""
    return tuple(component for component in COMPONENT_ORDER if component in info.component_keys)


# Above this size a freed component's memory is released at once (a full collection costs ~0.3 s).
BIG_COMPONENT_BYTES = 256 << 20

log = logging.getLogger("model_build")


@dataclass
class ConversionResult:
    output: Path
    converted: bool  # False when the output already held this source (a no-op)
    seconds: float
    message: str
    source_sha256: str | None = None
    lock_wait_seconds: float = 0.0  # time spent waiting for another process converting into the same output


def _stage(name: str) -> None:
    """A named point in a conversion. The crash tests replace this function to SIGKILL the process there."""
    log.debug("stage: %s", name)


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import huggingface_hub
    import safetensors
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "accelerate": accelerate.__version__,
        "huggingface_hub": huggingface_hub.__version__,
    }


def _release_memory() -> None:
    """Free what the last big step left and hand it back to the operating system.

    Modules keep reference cycles, so their storage waits for the garbage collector. And glibc keeps
    freed heap memory (most tensors below 32 MB land there) mapped, and counted in the process's
    memory, until asked to trim it: in the full-size run that was the UNet's 5 GB, still held while
    the reloaded pipeline was added on top of it.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _weights_bytes(info: CheckpointInfo, dtype: str) -> int:
    """About what the converted folder takes on disk: every converted tensor in ``dtype``."""
    header = read_header(info.path)
    size = DTYPES[dtype].itemsize
    return sum(math.prod(header.tensors[key].shape) * size for keys in info.component_keys.values() for key in keys)


def _component_tensors(
    component: str, info: CheckpointInfo, vae_file: VaeFile | None, dtype: str
) -> dict[str, torch.Tensor]:
    """One component's original-layout tensors, checked and cast to ``dtype``."""
    torch_dtype = DTYPES[dtype]
    if component == "vae" and vae_file is not None:
        tensors = {}
        where = f"--vae {vae_file.path.name}"
        for key, tensor in vae_file.tensors.items():
            cast = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
            check_cast(tensor, cast, key, where, dtype)
            tensors[key] = cast
        return tensors
    return dict(read_tensors(info.path, info.component_keys[component], torch_dtype, dtype, component))


def _prove_folder(
    staging: Path, info: CheckpointInfo, vae_file: VaeFile | None, dtype: str, tokenizers: dict[str, Any]
) -> dict[str, int]:
    """Load the folder as the runtime will and compare every component with the source tensors.

    The tokenizers just written are passed in rather than parsed again: they hold no weights.
    """
    from model_build.architectures import FAMILIES
    from model_build.completeness import prove_component
    from model_build.single_file import load_pipeline

    torch_dtype = DTYPES[dtype]
    pipe = load_pipeline(staging, torch_dtype, FAMILIES[info.family].pipeline_class, **tokenizers)
    proofs = {}
    try:
        with TensorReader(info.path) as reader:
            for component in _components_of(info):
                if component == "vae" and vae_file is not None:
                    keys = sorted(vae_file.tensors)
                    tensors = vae_file.tensors

                    def read(key: str, tensors: dict = tensors) -> torch.Tensor:
                        return tensors[key].to(torch_dtype)
                else:
                    keys = info.component_keys[component]

                    def read(key: str) -> torch.Tensor:
                        return reader.get(key).to(torch_dtype)

                log.info("proving %s: %d tensors against the checkpoint", component, len(keys))
                proof = prove_component(component, getattr(pipe, component), keys, read, torch_dtype, info.family)
                proofs[component] = proof.tensors
    finally:
        del pipe
        if info.path.stat().st_size > BIG_COMPONENT_BYTES:
            _release_memory()
    return proofs


def _build(
    info: CheckpointInfo,
    vae_file: VaeFile | None,
    source: FileIdentity,
    vae: FileIdentity | None,
    output: Path,
    dtype: str,
    prediction: Prediction,
) -> None:
    from model_build.architectures import materialize
    from model_build.completeness import assert_materialized
    from model_build.dev_model import DEV_MODEL_NOTICE
    from model_build.single_file import load_component, quiet_libraries, write_pipeline_files

    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        config_folder = materialize(info.config_name, work / "config")
        staging = work / "model"
        staging.mkdir()
        with quiet_libraries():
            for component in _components_of(info):
                tensors = _component_tensors(component, info, vae_file, dtype)
                log.info("converting %s (%d tensors)", component, len(tensors))
                module = load_component(component, tensors, config_folder, DTYPES[dtype])
                nbytes = sum(tensor.nbytes for tensor in tensors.values())
                del tensors  # the module holds the same storage; drop the dict before saving
                assert_materialized(component, module)
                module.save_pretrained(staging / component, safe_serialization=True)
                del module
                if nbytes > BIG_COMPONENT_BYTES:
                    _release_memory()
                _stage(f"saved {component}")
            tokenizers = write_pipeline_files(config_folder, staging, scheduler_overrides(prediction))
            _stage("saved pipeline files")
            log.info("reloading %s with from_pretrained to prove it holds exactly the checkpoint", output.name)
            proofs = _prove_folder(staging, info, vae_file, dtype, tokenizers)
        _stage("proved")
        manifest = Manifest(
            format=MANIFEST_FORMAT,
            converter_version=CONVERTER_VERSION,
            source=source.record(),
            vae=None if vae is None else vae.vae_record(vae_file.layout, vae_file.ignored),
            config=info.config_name,
            family=info.family,
            dev_model=info.is_dev_model,
            **({"notice": DEV_MODEL_NOTICE} if info.is_dev_model else {}),
            dtype=dtype,
            source_dtypes=info.dtypes,
            tensors=proofs,
            ignored_tensors=info.ignored,
            replaced_tensors=ReplacedTensors(count=len(info.replaced), by="--vae") if info.replaced else None,
            prediction=prediction,
            versions=library_versions(),
            files=describe_files(staging),
        )
        write_manifest(staging, manifest)
        fsync_tree(staging)
        _stage("manifest written")
        if output.exists():
            # --force: move the previous folder into the work folder (removed below), then rename the
            # new one in. A crash between the two renames leaves no output folder, never a mixed one.
            output.rename(work / "previous")
            _stage("previous output moved aside")
        staging.rename(output)
        fsync_dir(output.parent)
        _stage("renamed into place")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert(
    checkpoint: Path,
    output: Path,
    dtype: str = "fp16",
    force: bool = False,
    *,
    vae: Path | None = None,
    source_name: str | None = None,
    vae_name: str | None = None,
    source_sha256: str | None = None,
    vae_sha256: str | None = None,
    lock_timeout: float | None = None,
    replace_outdated: bool = False,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> ConversionResult:
    """Convert a local single-file SDXL checkpoint into a verified Diffusers folder at ``output``.

    A no-op when ``output`` already holds this checkpoint (same sha256, dtype, VAE and converter
    version) unless ``force``. An output holding something else is replaced only with ``force`` or
    ``replace_outdated``; a folder not made by model_build is never replaced. ``vae`` replaces the
    checkpoint's VAE with a separate file. ``source_name``/``vae_name`` are recorded in the manifest
    (e.g. the hf:// URI); ``source_sha256``/``vae_sha256`` are hashes already computed by the caller.
    ``lock_timeout`` bounds the wait for another conversion into the same output (None: no bound).
    ``prediction_type`` (epsilon | v_prediction) and ``zero_terminal_snr`` override what the checkpoint's
    markers say (None: the markers decide; :mod:`model_build.prediction`).
    """
    started = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    vae_path = Path(vae) if vae is not None else None
    check_file_format(checkpoint)  # pickles are refused before anything else looks at them
    if vae_path is not None:
        check_file_format(vae_path, role="--vae file")
    source = FileIdentity(checkpoint, source_name or checkpoint.name, source_sha256)
    vae_identity = FileIdentity(vae_path, vae_name or vae_path.name, vae_sha256) if vae_path is not None else None

    def up_to_date(waited: float) -> ConversionResult:
        seconds = time.perf_counter() - started
        message = (
            f"{output} is up to date: it holds {source.name} (sha256 {source.sha256[:12]}…, {dtype}); "
            "nothing to do (pass --force to convert again)"
        )
        return ConversionResult(output, False, seconds, message, source.sha256, waited)

    # A finished folder only ever appears by rename, so an up-to-date one can be trusted without the
    # lock; and its source is byte for byte the one that passed every check when it was converted.
    wanted = (prediction_type, zero_terminal_snr)
    if not force and output_state(output, source, vae_identity, dtype, *wanted)[0] == "current":
        remove_leftovers_if_idle(output)
        return up_to_date(0.0)
    check_output_location(output)
    log.info("checking %s", checkpoint)
    info = inspect_checkpoint(checkpoint, vae_replaced=vae_path is not None)
    vae_file = load_vae_file(vae_path, info.config_name) if vae_path is not None else None
    prediction = decide_prediction(info.markers, prediction_type, zero_terminal_snr)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with conversion_lock(output, lock_timeout) as waited:
            state, why = output_state(output, source, vae_identity, dtype, *wanted)
            if state == "current" and not force:
                return up_to_date(waited)  # another process converted it while this one waited
            if state == "foreign":
                raise ConversionError(f"{output} {why}; move it away or choose another --output")
            if state in ("outdated", "damaged") and not (force or replace_outdated):
                raise ConversionError(f"{output} {why}; pass --force to replace it")
            if state != "missing":
                log.info("replacing %s: it %s", output, why or "is replaced (--force)")
            remove_leftovers(output)
            _build(info, vae_file, source, vae_identity, output, dtype, prediction)
    except (OSError, SafetensorError) as error:
        raise_output_problem(error, output, lambda: _weights_bytes(info, dtype))
        raise
    seconds = time.perf_counter() - started
    what = f"{dtype}, {info.config_name}, {describe(prediction)}"
    message = f"converted {source.name} -> {output} ({what}) in {seconds:.1f} s"
    return ConversionResult(output, True, seconds, message, source.sha256, waited)


def ensure_converted(
    checkpoint: Path,
    output: Path,
    lock_timeout: float | None = 3600.0,
    dtype: str = "fp16",
    vae: Path | None = None,
) -> ConversionResult:
    """Make sure ``output`` holds the conversion of ``checkpoint``; convert it if not (for the worker's first start).

    Cheap when the folder is up to date (no hashing when the checkpoint's size and mtime match the
    manifest). Otherwise converts under the lock; a second caller waits for the first one and then
    finds the folder done, so a checkpoint is never converted twice. An existing conversion of
    another checkpoint, dtype or converter version is replaced; a folder not made by model_build
    is not.
    """
    return convert(checkpoint, output, dtype, vae=vae, lock_timeout=lock_timeout, replace_outdated=True)
