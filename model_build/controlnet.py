"""Convert an SDXL ControlNet single file into a verified ``ControlNetModel`` folder, atomically.

The same steps, proof and manifest as a checkpoint (:mod:`model_build.convert`), for one component:

1. inspect: refuse pickles and damaged files, name what a foreign file is (ControlNet-Union, Control-LoRA, LLLite,
   T2I-Adapter, an SD 1.x/2.x ControlNet), find the layout (:mod:`.controlnet_layout`) and the shipped config whose
   every tensor name and shape the file has, exactly;
2. convert: the tensors, streamed with NaN/Inf checks and cast to the target dtype, renamed by diffusers' own key map
   (plus the ``label_emb`` tensors it drops), loaded by ``ControlNetModel.from_single_file`` with the shipped config
   and the Hub off, saved with ``save_pretrained``;
3. prove: reload the folder with ``ControlNetModel.from_pretrained`` (as the worker does) and compare every tensor,
   mapped back to the file's name, with the file's, exactly;
4. record ``manifest.json`` (family ``sdxl-controlnet``) and rename the folder into place, under the same lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_build.checkpoint import name_problems, refuse_non_float_weights
from model_build.checkpoint_file import TensorReader, check_file_format, read_header
from model_build.controlnet_layout import (
    CONTROLNET_CONFIGS,
    CONTROLNET_FAMILY,
    controlnet_config,
    controlnet_layout,
    expected_shapes,
    foreign_controlnet,
    other_family,
    strip_original_prefix,
    to_diffusers_names,
    to_layout,
)
from model_build.errors import CheckpointError, CompletenessError, ConversionError, shown_names
from model_build.manifest import CONVERTER_VERSION, MANIFEST_FORMAT, Manifest, describe_files, write_manifest
from model_build.output_folder import check_output_location, conversion_lock, fsync_dir, fsync_tree, remove_leftovers
from model_build.output_state import FileIdentity, output_state

log = logging.getLogger("model_build")

DEV_CONTROLNET_METADATA_KEY = "sdxl_worker.dev_controlnet"
CONTROLNET_ADVICE = (
    "this converter takes SDXL ControlNets (ControlNetModel) in diffusers' single-file layout or the original "
    "control_model.* layout"
)


@dataclass(frozen=True)
class ControlNetInfo:
    path: Path
    layout: str  # "diffusers" or "original"
    config_name: str
    is_dev_model: bool
    keys: tuple[str, ...]  # the file's tensor names, sorted
    dtypes: tuple[str, ...]


def is_controlnet_file(path: Path) -> bool:
    """Whether a safetensors file holds a ControlNet (of any family or kind): the converter's dispatch test."""
    keys = read_header(path).tensors
    return controlnet_layout(keys) is not None or foreign_controlnet(keys) is not None


def _choose_config(path: Path, shapes: dict[str, tuple[int, ...]], layout: str) -> str:
    """The shipped config whose tensors the file holds exactly; otherwise an error naming the differences."""
    names = strip_original_prefix(shapes) if layout == "original" else {key: key for key in shapes}
    found = {names[key]: shape for key, shape in shapes.items()}
    scores = {}
    for name in CONTROLNET_CONFIGS:
        expected = expected_shapes(name, layout)
        scores[name] = sum(1 for key, shape in expected.items() if found.get(key) == shape)
        if found == expected:
            return name
    best = max(scores, key=scores.__getitem__)
    expected = expected_shapes(best, layout)
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    reshaped = sorted(key for key in found if key in expected and found[key] != expected[key])
    differ = [f"{key} is {list(found[key])}, expected {list(expected[key])}" for key in reshaped]
    parts = name_problems(missing, unknown, len(expected))
    if differ:
        parts.append(f"{len(differ)} tensors of another shape ({shown_names(differ)})")
    raise CheckpointError(
        f"{path.name} is an SDXL ControlNet ({layout} layout) whose tensors match no shipped config (closest: {best}: "
        + "; ".join(parts)
        + f"). Only full-size SDXL ControlNets ({', '.join(CONTROLNET_CONFIGS)}) convert; the 'mid' and 'small' "
        "variants and other reduced ControlNets are not supported."
    )


def inspect_controlnet(path: Path) -> ControlNetInfo:
    """Every check that needs no tensor data: format, header, kind, family, layout, config, names and shapes."""
    path = Path(path)
    check_file_format(path)
    header = read_header(path)
    shapes = {key: entry.shape for key, entry in header.tensors.items()}
    foreign = foreign_controlnet(shapes)
    if foreign is not None:
        raise CheckpointError(f"{path.name} is {foreign}; {CONTROLNET_ADVICE}.")
    layout = controlnet_layout(shapes)
    if layout is None:
        raise CheckpointError(
            f"{path.name} is not a ControlNet (no conditioning-image embedding); {CONTROLNET_ADVICE}."
        )
    family = other_family(shapes, layout)
    if family is not None:
        raise CheckpointError(
            f"{path.name} is {family}. SDXL models take SDXL ControlNets only; get the SDXL version of this ControlNet."
        )
    config_name = _choose_config(path, shapes, layout)
    refuse_non_float_weights(path.name, header.tensors, shapes)
    try:
        is_dev = bool(json.loads(header.metadata.get(DEV_CONTROLNET_METADATA_KEY, "null")))
    except ValueError:
        is_dev = False
    dtypes = tuple(sorted({entry.dtype for entry in header.tensors.values()}))
    return ControlNetInfo(path, layout, config_name, is_dev, tuple(sorted(shapes)), dtypes)


def _load(info: ControlNetInfo, dtype: torch.dtype, dtype_name: str, config_folder: Path) -> torch.nn.Module:
    from diffusers import ControlNetModel

    from model_build.single_file import offline
    from model_build.tensor_checks import read_tensors

    tensors = dict(read_tensors(info.path, info.keys, dtype, dtype_name, "controlnet"))
    renamed = to_diffusers_names(tensors, controlnet_config(info.config_name), info.layout)
    del tensors
    with offline():
        return ControlNetModel.from_single_file(renamed, config=str(config_folder), local_files_only=True, dtype=dtype)


def _prove(folder: Path, info: ControlNetInfo, dtype: torch.dtype) -> int:
    """Reload ``folder`` as the worker does and compare every tensor with the file's; the count proven."""
    from diffusers import ControlNetModel

    from model_build.completeness import assert_materialized
    from model_build.single_file import offline

    with offline():
        net = ControlNetModel.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    assert_materialized("controlnet", net)
    mapped = to_layout(net.state_dict(), controlnet_config(info.config_name), info.layout)
    file_names = strip_original_prefix(info.keys) if info.layout == "original" else {k: k for k in info.keys}
    landed = {file_names[key] for key in info.keys}
    if set(mapped) != landed:
        raise CompletenessError(
            f"controlnet: the folder's tensors are not the file's: {len(set(mapped) - landed)} did not come from it "
            f"({shown_names(sorted(set(mapped) - landed))}), {len(landed - set(mapped))} did not land "
            f"({shown_names(sorted(landed - set(mapped)))})"
        )
    differ = []
    with TensorReader(info.path) as reader:
        for key in info.keys:
            expected = reader.get(key).to(dtype)
            actual = mapped[file_names[key]]
            if actual.dtype != dtype or actual.shape != expected.shape or not torch.equal(actual, expected):
                differ.append(key)
    if differ:
        raise CompletenessError(
            f"controlnet: {len(differ)} of {len(info.keys)} tensors differ from the file after conversion "
            f"({shown_names(differ)})"
        )
    return len(info.keys)


def _build(info: ControlNetInfo, source: FileIdentity, output: Path, dtype_name: str) -> None:
    from model_build import convert as checkpoint_convert
    from model_build.completeness import assert_materialized
    from model_build.dev_model import DEV_MODEL_NOTICE
    from model_build.single_file import quiet_libraries

    dtype = checkpoint_convert.DTYPES[dtype_name]
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        config_folder = work / "config"
        config_folder.mkdir()
        config = {"_class_name": "ControlNetModel", **controlnet_config(info.config_name)}
        (config_folder / "config.json").write_text(json.dumps(config, indent=2))
        staging = work / "model"
        with quiet_libraries():
            log.info("converting %s (%d tensors, %s layout)", info.path.name, len(info.keys), info.layout)
            net = _load(info, dtype, dtype_name, config_folder)
            assert_materialized("controlnet", net)
            net.save_pretrained(staging, safe_serialization=True)
            del net
            checkpoint_convert._stage("saved controlnet")
            log.info("reloading %s with from_pretrained to prove it holds exactly the file", output.name)
            proven = _prove(staging, info, dtype)
        checkpoint_convert._stage("proved")
        manifest = Manifest(
            format=MANIFEST_FORMAT,
            converter_version=CONVERTER_VERSION,
            source=source.record(),
            config=info.config_name,
            family=CONTROLNET_FAMILY,
            layout=info.layout,  # how the file named its tensors: diffusers or original (control_model.*)
            dev_model=info.is_dev_model,
            **({"notice": DEV_MODEL_NOTICE} if info.is_dev_model else {}),
            dtype=dtype_name,
            source_dtypes=info.dtypes,
            tensors={"controlnet": proven},
            versions=checkpoint_convert.library_versions(),
            files=describe_files(staging),
        )
        write_manifest(staging, manifest)
        fsync_tree(staging)
        if output.exists():
            output.rename(work / "previous")  # --force: the old folder goes with the work folder
        staging.rename(output)
        fsync_dir(output.parent)
        checkpoint_convert._stage("renamed into place")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_controlnet(
    path: Path,
    output: Path,
    dtype: str = "fp16",
    force: bool = False,
    *,
    source_name: str | None = None,
    source_sha256: str | None = None,
    lock_timeout: float | None = None,
):
    """Convert a local SDXL ControlNet file into a verified folder at ``output`` (a no-op when it holds it already).

    The rules of :func:`model_build.convert.convert`: an up-to-date output is left alone, an outdated one is replaced
    only with ``force``, a folder not made by model_build never is; killed at any moment, no half folder remains.
    """
    from model_build import convert as checkpoint_convert

    started = time.perf_counter()
    path, output = Path(path), Path(output)
    if dtype not in checkpoint_convert.DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(checkpoint_convert.DTYPES)}")
    check_file_format(path)
    source = FileIdentity(path, source_name or path.name, source_sha256)

    def result(converted: bool, waited: float) -> checkpoint_convert.ConversionResult:
        seconds = time.perf_counter() - started
        if converted:
            message = f"converted ControlNet {source.name} -> {output} ({dtype}, {info.config_name}) in {seconds:.1f} s"
        else:
            message = (
                f"{output} is up to date: it holds {source.name} (sha256 {source.sha256[:12]}…, {dtype}); "
                "nothing to do (pass --force to convert again)"
            )
        return checkpoint_convert.ConversionResult(output, converted, seconds, message, source.sha256, waited)

    if not force and output_state(output, source, None, dtype)[0] == "current":
        return result(False, 0.0)
    check_output_location(output)
    info = inspect_controlnet(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with conversion_lock(output, lock_timeout) as waited:
        state, why = output_state(output, source, None, dtype)
        if state == "current" and not force:
            return result(False, waited)
        if state == "foreign":
            raise ConversionError(f"{output} {why}; move it away or choose another --output")
        if state in ("outdated", "damaged") and not force:
            raise ConversionError(f"{output} {why}; pass --force to replace it")
        remove_leftovers(output)
        _build(info, source, output, dtype)
    return result(True, waited)
