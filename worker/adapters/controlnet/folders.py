"""Which converted ControlNet a request's ``name`` means, and whether it fits the model being served.

A name is a folder under one of the ControlNet roots (``CONTROLNET_DIR``, then the image's baked ``/controlnets``),
made by ``python -m model_build convert`` from an SDXL ControlNet file: its ``manifest.json`` must say family
``sdxl-controlnet`` and the folder must still match it (sizes; the hashes were proven when it was converted). A
ControlNet fits the base when its residuals have the UNet's shapes and it reads the same conditioning: the same
block widths, depth, latent channels, cross-attention width and text-time embedding. Everything here reads JSON
only, so a bad name costs no model load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest
from model_build.controlnet_layout import CONTROLNET_FAMILY
from model_build.manifest import MANIFEST_NAME, Manifest, ModelFolderError, manifest_hash, verify

# The ControlNet config values that must equal the UNet's for its residuals and conditioning to fit.
MATCHING_CONFIG = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
CONVERT_HINT = "python -m model_build convert CONTROLNET.safetensors --output CONTROLNET_DIR/NAME"


@dataclass(frozen=True)
class ControlNetFolder:
    """A converted ControlNet found for a request's name."""

    name: str
    path: Path
    manifest_hash: str
    config_name: str
    weight_bytes: int  # its weight files on disk: what loading it adds to memory (same dtype)
    dev_model: bool

    @property
    def identity(self) -> tuple[str, str]:
        """Changes whenever the folder is converted again: a cache entry of another identity is stale."""
        return (str(self.path), self.manifest_hash)


def _weight_bytes(manifest: Manifest) -> int:
    return sum(entry.size for name, entry in manifest.files.items() if name.endswith(".safetensors"))


def available(roots: tuple[Path, ...]) -> list[str]:
    """The names of the folders that look converted (they have a manifest), for error messages and health checks."""
    names: set[str] = set()
    for root in roots:
        if root.is_dir():
            names.update(path.parent.name for path in root.glob(f"*/{MANIFEST_NAME}"))
    return sorted(names)


def find(name: str, roots: tuple[Path, ...], field: str) -> ControlNetFolder:
    """The converted ControlNet ``name``; :class:`InvalidRequest` naming ``field`` when there is none (or not one)."""
    for root in roots:
        folder = root / name
        if folder.is_dir():
            return _checked(name, folder, field)
    shown = ", ".join(available(roots)) or "none"
    where = ", ".join(str(root) for root in roots)
    raise InvalidRequest(
        f"{field}: no ControlNet named {name!r} in {where} (available: {shown}); convert one there with {CONVERT_HINT}"
    )


def _checked(name: str, folder: Path, field: str) -> ControlNetFolder:
    try:
        manifest = verify(folder)
    except ModelFolderError as error:
        raise InvalidRequest(f"{field}: {name!r} is not a usable converted ControlNet: {error}") from None
    family = manifest.family or "sdxl-base"
    if family != CONTROLNET_FAMILY:
        raise InvalidRequest(
            f"{field}: {folder} holds a converted {family} model, not an SDXL ControlNet; put ControlNets converted "
            f"with {CONVERT_HINT} there"
        )
    return ControlNetFolder(
        name=name,
        path=folder,
        manifest_hash=manifest_hash(folder),
        config_name=str(manifest.config),
        weight_bytes=_weight_bytes(manifest),
        dev_model=manifest.dev_model,
    )


def check_fits(
    folder: ControlNetFolder, controlnet_config: Mapping[str, Any], unet_config: Mapping[str, Any], field: str
) -> None:
    """Refuse a ControlNet whose residuals or conditioning do not fit the served UNet, naming what differs."""
    differ = [
        f"{key} {_plain(controlnet_config.get(key))} (the model's {_plain(unet_config.get(key))})"
        for key in MATCHING_CONFIG
        if _plain(controlnet_config.get(key)) != _plain(unet_config.get(key))
    ]
    if differ:
        raise InvalidRequest(
            f"{field}: ControlNet {folder.name!r} ({folder.config_name}) does not fit this worker's model: "
            + "; ".join(differ)
            + ". Use a ControlNet made for this SDXL architecture"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def largest_weights(roots: tuple[Path, ...], count: int) -> list[int]:
    """The weight sizes of the ``count`` largest converted ControlNets under ``roots`` (for memory planning)."""
    sizes = []
    for name in available(roots):
        for root in roots:
            if (root / name / MANIFEST_NAME).is_file():
                with contextlib.suppress(ModelFolderError):  # refused by name when a job asks for it
                    manifest = verify(root / name)
                    if manifest.family == CONTROLNET_FAMILY:
                        sizes.append(_weight_bytes(manifest))
                break
    return sorted(sizes, reverse=True)[:count]
