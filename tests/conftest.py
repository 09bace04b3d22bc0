"""Shared fixtures: the built-in dev model, made and converted once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# MKL's results depend on memory alignment unless strict reproducibility is on; exact-equality tests (a no-LoRA job
# after LoRA jobs equals a fresh worker) then fail by ~1e-5 when loading changed the heap. Read at MKL's first call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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


@pytest.fixture(scope="session")
def dev_refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev refiner, converted: it shares the dev base's VAE and second text encoder, as SDXL 1.0's pair does."""
    from model_build.convert import convert
    from model_build.dev_model import write_dev_checkpoint

    checkpoint = write_dev_checkpoint(
        tmp_path_factory.mktemp("checkpoint") / "sdxl-dev-refiner.safetensors", refiner=True
    )
    output = tmp_path_factory.mktemp("models") / "sdxl-dev-refiner"
    convert(checkpoint, output)
    return output


@pytest.fixture(scope="session")
def worker_api_server(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The worker's local RunPod API server (``--rp_serve_api``) on a free loopback port; yields its base URL.

    It is started, not waited for: the first client must retry until it listens (the batch runner's remote
    mode is tested on exactly that). One torch thread, as every byte-for-byte comparison in the tests uses.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}  # no progress posts
    env.update(
        MODEL_DIR=str(dev_model_dir),
        PYTHONPATH=str(root),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        UVICORN_LOG_LEVEL="warning",
    )
    log = open(tmp_path_factory.mktemp("worker-api") / "worker.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
