"""Loading converted folders: each checked against its manifest and its family, the refiner sharing the base's
VAE and second text encoder when their files are byte-identical."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError
from model_build.architectures import family_of_manifest
from model_build.manifest import Manifest, manifest_hash


def require_family(manifest: Manifest, folder: Path, family: str | tuple[str, ...], setting: str) -> str:
    """A folder converted from another family (a refiner as the base, a base as the refiner) is refused by name;
    returns the folder's family (one of ``family``)."""
    try:
        found = family_of_manifest(manifest).name
    except ValueError as error:
        raise ConfigurationError(f"{setting} {folder}: {error}") from None
    families = (family,) if isinstance(family, str) else family
    if found not in families:
        wanted = " or ".join(families)
        raise ConfigurationError(
            f"{setting} {folder} holds a converted {found} model, not {wanted}; point {setting} at a folder converted "
            f"from an {wanted} checkpoint (python -m model_build convert CHECKPOINT.safetensors --output DIR)"
        )
    return found


def shared_with_base(refiner_manifest: Manifest, base_manifest: Manifest) -> list[str]:
    """The components (VAE, second text encoder) whose weight files the refiner and the base share byte for byte:
    the refiner takes the base's loaded modules instead of a second copy."""
    shared = []
    for component in ("vae", "text_encoder_2"):
        weights = f"{component}/{'diffusion_pytorch_model' if component == 'vae' else 'model'}.safetensors"
        digest = refiner_manifest.file_sha256(weights)
        if digest and digest == base_manifest.file_sha256(weights):
            shared.append(component)
    return shared


def load_refiner(
    refiner_dir: Path,
    manifest: Manifest,
    base: Any,
    shares: list[str],
    dtype: Any,
    pipeline_class: Any,
    load_options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The refiner pipeline from its verified folder (of the refiner family), with the base's modules for the
    components in ``shares``."""
    shared = {component: getattr(base, component) for component in shares}
    refiner = pipeline_class.from_pretrained(
        refiner_dir, dtype=dtype, local_files_only=True, use_safetensors=True, **shared, **(load_options or {})
    )
    refiner.set_progress_bar_config(disable=True)
    info = {"name": refiner_dir.name, "manifest_hash": manifest_hash(refiner_dir), "shares_with_base": sorted(shared)}
    return refiner, info


class PhaseClock:
    """Seconds since the previous lap, recorded under each lap's name."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 3)
        self.last = now
