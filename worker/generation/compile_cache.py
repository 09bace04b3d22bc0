"""The persistent compile cache: torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``), one file
per (torch, GPU, model architecture, options) key, written atomically after a compiling warm-up and loaded before the
next one, so a warm start skips Inductor's code generation and autotuning."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def device_identity(device: torch.device) -> dict[str, Any]:
    """The torch build and the device compiled code is made for (part of every compiled artefact's key)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}


def compile_cache_key(pipe: Any, options: Any) -> str:
    """What the compiled code depends on: torch, the GPU, the architecture (not the weights), dtypes, options."""
    parts = {
        "format": CACHE_FORMAT,
        **device_identity(pipe.unet.device),
        "unet": config_digest(pipe.unet.config),
        "vae": config_digest(pipe.vae.config),
        "unet_dtype": str(pipe.unet.dtype),
        "vae_dtype": str(pipe.vae.dtype),
        "options": {k: v for k, v in asdict(options).items() if k != "cache_dir"},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def compile_cache_file(pipe: Any, options: Any) -> Path | None:
    """``options``: the :class:`.acceleration.SpeedupOptions` applied (their ``cache_dir`` is where the file goes)."""
    if options.cache_dir is None:
        return None
    return Path(options.cache_dir) / f"sdxl-compile-{compile_cache_key(pipe, options)}.bin"


def load_compile_cache(path: Path) -> tuple[bool, float, int]:
    """Load cache artifacts from ``path`` into torch's local caches: (hit, seconds, bytes). A bad file is a miss."""
    started = time.perf_counter()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False, 0.0, 0
    except OSError as error:
        log.warning("compile cache %s unreadable (%s); compiling from scratch", path, error)
        return False, 0.0, 0
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as error:  # a file from another torch build: compile afresh rather than fail start-up
        log.warning("compile cache %s not loadable (%s: %s); compiling from scratch", path, type(error).__name__, error)
        return False, time.perf_counter() - started, len(data)
    return info is not None, time.perf_counter() - started, len(data)


def save_compile_cache(path: Path) -> tuple[float, int]:
    """Write this process's cache artifacts to ``path`` atomically (temporary file + rename): (seconds, bytes)."""
    started = time.perf_counter()
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return time.perf_counter() - started, 0
    data = artifacts[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:  # a read-only or full volume costs the next start a compile, not this one its jobs
        log.warning("compile cache not saved to %s: %s", path, error)
        return time.perf_counter() - started, 0
    return time.perf_counter() - started, len(data)


def config_digest(config: Any) -> str:
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]
