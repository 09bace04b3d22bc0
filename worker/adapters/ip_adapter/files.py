"""Which IP-Adapter file a request's ``name`` means, whether it fits the served UNet, and which image encoder it reads.

A name is a ``.safetensors`` file in an IP-Adapter root's ``sdxl_models/`` folder (h94/IP-Adapter's layout,
:mod:`model_build.ip_adapter_layout`) or in the root itself, searched in ``IP_ADAPTER_DIR``'s order, then the image's
baked ``/ip-adapters``. What the file is, whether it fits the UNet and which encoder folder fits it are read from its
safetensors header and the encoders' ``config.json``: a bad name, a file for another model or a missing encoder
costs no load. Pickles (h94 publishes ``.bin`` copies too) are never opened.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidRequest
from core.safetensors_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, SafetensorsDamage, read_header
from model_build.ip_adapter_layout import (
    ADAPTER_SUBFOLDER,
    ENCODER_FOLDER,
    ENCODER_FOLDERS,
    AdapterShape,
    describe,
    fit_problem,
)

ENCODER_WEIGHTS = "model.safetensors"
LAYOUT_HINT = (
    "put h94/IP-Adapter's layout there (huggingface-cli download h94/IP-Adapter --include 'sdxl_models/*' "
    "'models/image_encoder/*' --local-dir IP_ADAPTER_DIR)"
)


@dataclass(frozen=True)
class EncoderFolder:
    """A ``CLIPVisionModelWithProjection`` folder an adapter reads, and the config values that decide the fit."""

    path: Path
    shown: str  # for the metadata: relative to its root
    projection_dim: int
    hidden_size: int
    image_size: int
    values: int  # floating-point values in its weights (what loading it adds to memory, times the dtype's size)
    identity: tuple[str, int, int]  # path, size and mtime of its weights: another file loads again

    def width(self, key: str) -> int:
        return self.projection_dim if key == "projection_dim" else self.hidden_size


@dataclass(frozen=True)
class AdapterFile:
    """An IP-Adapter file found for a request's name, with what it needs."""

    name: str
    path: Path
    shown: str  # relative to its root
    shape: AdapterShape
    encoder: EncoderFolder
    values: int
    identity: tuple[str, int, int]


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _float_values(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    header = read_header(path)
    values = sum(math.prod(entry.shape) for entry in header.tensors.values() if entry.is_float)
    return {key: entry.shape for key, entry in header.tensors.items()}, values


def available(roots: tuple[Path, ...]) -> list[str]:
    """The names of the ``.safetensors`` files in the roots' ``sdxl_models/`` folders and the roots (for errors)."""
    names: set[str] = set()
    for root in roots:
        for folder in (root / ADAPTER_SUBFOLDER, root):
            if folder.is_dir():
                names.update(path.stem for path in folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    return sorted(names)


def find(name: str, roots: tuple[Path, ...], field: str) -> tuple[Path, Path]:
    """(the file, its root) of adapter ``name``; :class:`InvalidRequest` naming ``field`` when there is none."""
    for root in roots:
        for folder in (root / ADAPTER_SUBFOLDER, root):
            path = folder / f"{name}{SAFETENSORS_SUFFIX}"
            if path.is_file():
                return path, root
            pickles = [
                folder / f"{name}{suffix}" for suffix in PICKLE_SUFFIXES if (folder / f"{name}{suffix}").is_file()
            ]
            if pickles:
                raise InvalidRequest(
                    f"{field}: {pickles[0]} is a pickle, which this worker never loads (it can run code); put the "
                    f"{name}{SAFETENSORS_SUFFIX} file there instead (h94/IP-Adapter publishes both)"
                )
    shown = ", ".join(available(roots)) or "none"
    where = ", ".join(str(root) for root in roots)
    raise InvalidRequest(f"{field}: no IP-Adapter named {name!r} in {where} (available: {shown}); {LAYOUT_HINT}")


def inspect(name: str, path: Path, root: Path, field: str) -> AdapterFile:
    """What the file at ``path`` is and which encoder under ``root`` it reads; InvalidRequest naming ``field`` for a
    file that is not a usable SDXL IP-Adapter or has no encoder."""
    try:
        shapes, values = _float_values(path)
        shape = describe(shapes)
    except (SafetensorsDamage, ValueError) as error:
        raise InvalidRequest(f"{field}: {name!r} ({path}) {error}") from None
    encoder = choose_encoder(name, path, root, shape, field)
    return AdapterFile(name, path, _shown(path, root), shape, encoder, values, _identity(path))


def check_fits(adapter: AdapterFile, unet_widths: list[int], cross_attention_dim: int, field: str) -> None:
    """Refuse an adapter whose layers do not fit the served UNet's cross-attention, saying what differs."""
    problem = fit_problem(adapter.shape, unet_widths, cross_attention_dim)
    if problem is not None:
        raise InvalidRequest(
            f"{field}: IP-Adapter {adapter.name!r} does not fit this worker's model: {problem}. Use an SDXL "
            "IP-Adapter (ip-adapter_sdxl, ip-adapter_sdxl_vit-h, ip-adapter-plus_sdxl_vit-h, ...)"
        )


def _shown(path: Path, root: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(root))
    return str(path)


def encoder_candidates(path: Path, root: Path) -> list[Path]:
    """Where an adapter's image encoder may be: next to the file, then the layout's two encoder folders."""
    candidates = [path.parent / ENCODER_FOLDER, *(root / folder for folder in ENCODER_FOLDERS)]
    return list(dict.fromkeys(candidates))


def read_encoder(folder: Path, root: Path) -> EncoderFolder | str:
    """The encoder folder's fit-deciding values, or why it cannot be one."""
    weights = folder / ENCODER_WEIGHTS
    try:
        config = json.loads((folder / "config.json").read_text())
        config = config.get("vision_config", config)  # a CLIPConfig saved whole
        values = (int(config["projection_dim"]), int(config["hidden_size"]), int(config.get("image_size", 224)))
    except FileNotFoundError:
        return "no config.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"an unreadable config.json ({type(error).__name__}: {error})"
    if not weights.is_file():
        return f"no {ENCODER_WEIGHTS} (only safetensors weights are loaded)"
    try:
        _, count = _float_values(weights)
    except (SafetensorsDamage, OSError) as error:
        return f"a damaged {ENCODER_WEIGHTS} ({error})"
    return EncoderFolder(folder, _shown(folder, root), *values, count, _identity(weights))


def choose_encoder(name: str, path: Path, root: Path, shape: AdapterShape, field: str) -> EncoderFolder:
    """The first encoder folder whose width is the one the adapter reads (its projection for the plain kind, its
    hidden states for plus); InvalidRequest listing what each candidate has otherwise."""
    seen = []
    for folder in encoder_candidates(path, root):
        if not folder.is_dir():
            continue
        encoder = read_encoder(folder, root)
        if isinstance(encoder, str):
            seen.append(f"{folder} has {encoder}")
        elif encoder.width(shape.encoder_key) == shape.encoder_width:
            return encoder
        else:
            seen.append(f"{folder} has {shape.encoder_key} {encoder.width(shape.encoder_key)}")
    found = "; ".join(seen) or "none of " + ", ".join(str(folder) for folder in encoder_candidates(path, root))
    raise InvalidRequest(
        f"{field}: IP-Adapter {name!r} ({shape.kind}) reads an image encoder with {shape.encoder_key} "
        f"{shape.encoder_width}, and no encoder folder fits ({found}); {LAYOUT_HINT}"
    )


def usable(roots: tuple[Path, ...]) -> list[AdapterFile]:
    """Every adapter file under ``roots`` with an encoder that fits (for memory planning; the UNet is not checked)."""
    found = []
    for name in available(roots):
        with contextlib.suppress(InvalidRequest):  # refused by name when a job asks for it
            path, root = find(name, roots, "ip_adapters")
            found.append(inspect(name, path, root, "ip_adapters"))
    return found
