"""Which converted folder the worker serves, and its conversion on first start.

``MODEL_DIR`` names the folder. Without it: the network volume's ``/runpod-volume/models/<MODEL_NAME>``
when present, else the folder baked into the image, ``/models/<MODEL_NAME>``. With
``CHECKPOINT_PATH`` (a ``.safetensors`` on the network volume), the first worker to start converts
it into the model folder under a file lock; the others wait and then load the finished folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

VOLUME_MODELS = Path("/runpod-volume/models")
BAKED_MODELS = Path("/models")
DEFAULT_MODEL_NAME = "sdxl"


def resolve_model_dir(env: Mapping[str, str] = os.environ) -> Path:
    if env.get("MODEL_DIR"):
        return Path(env["MODEL_DIR"])
    checkpoint = env.get("CHECKPOINT_PATH")
    name = env.get("MODEL_NAME") or (Path(checkpoint).stem if checkpoint else DEFAULT_MODEL_NAME)
    volume_dir = VOLUME_MODELS / name
    if checkpoint or volume_dir.exists():
        return volume_dir
    return BAKED_MODELS / name


def prepare_model_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The model folder to load, converting ``CHECKPOINT_PATH`` into it first if needed (once, locked)."""
    model_dir = resolve_model_dir(env)
    checkpoint = env.get("CHECKPOINT_PATH")
    if checkpoint:
        from model_build.convert import ensure_converted

        ensure_converted(Path(checkpoint), model_dir)
    return model_dir
