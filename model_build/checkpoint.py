"""Read a single-file checkpoint's header and decide what it is, before any conversion."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from model_build.dev_model import DEV_METADATA_KEY


class CheckpointError(Exception):
    """The file is not a convertible SDXL safetensors checkpoint; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config_name: str
    is_dev_model: bool
    num_tensors: int


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
    try:
        dev_config = json.loads(metadata.get(DEV_METADATA_KEY, "{}")).get("config")
    except (ValueError, AttributeError):
        dev_config = None
    config_name = dev_config if dev_config in ("dev_tiny", "sdxl_base") else "sdxl_base"
    return CheckpointInfo(path, config_name, dev_config is not None, len(keys))
