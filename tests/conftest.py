"""Shared fixtures: the built-in dev model, made and converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("default")


@pytest.fixture(scope="session")
def dev_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_build.dev_model import write_dev_checkpoint

    return write_dev_checkpoint(tmp_path_factory.mktemp("checkpoint") / "sdxl-dev.safetensors")


@pytest.fixture(scope="session")
def dev_model_dir(dev_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted, verified Diffusers folder of the dev model (fp16 on disk)."""
    from model_build.convert import convert

    output = tmp_path_factory.mktemp("models") / "sdxl-dev"
    convert(dev_checkpoint, output)
    return output
