"""Shared fixtures: the built-in dev model, made and converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.worker_api import serve_worker_api

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# MKL's results depend on memory alignment unless strict reproducibility is on; exact-equality tests (a no-LoRA job
# after LoRA jobs equals a fresh worker) then fail by ~1e-5 when loading changed the heap. Read at MKL's first call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("default")

# Seconds per test file on 2 cores (pytest -n 2 --dist loadfile --durations=0, 2026-12-04), for scheduling only:
# pytest-xdist hands whole files to its workers in collection order, so a long file collected last leaves one core
# idle at the end (the suite took 10.1 min for 8.4 min of work per core). Longest first packs the two cores evenly.
# test_aot_unet.py builds real AOTInductor packages (the base's and the refiner's), test_aot_vae.py two more.
FILE_SECONDS = {
    "tests/worker/test_aot_unet.py": 197,
    "tests/batch/test_batch_runs.py": 72,
    "tests/worker/test_worker_handler.py": 50,
    "tests/test_readme_newcomer.py": 44,
    "tests/worker/test_aot_vae.py": 43,
    "tests/batch/test_batch_takeover.py": 34,
    "tests/worker/test_loras.py": 31,
    "tests/worker/test_worker_dropin.py": 28,
    "tests/batch/test_batch_interrupt.py": 26,
    "tests/worker/test_ip_adapters.py": 24,
    "tests/model_build/test_mb_crash.py": 23,
    "tests/worker/test_prompt_encoder.py": 19,
    "tests/worker/test_embeddings.py": 16,
    "tests/worker/test_model_location.py": 15,
    "tests/worker/test_image_downloads.py": 15,
    "tests/model_build/test_mb_roundtrip.py": 13,
    "tests/batch/test_batch_remote.py": 12,
    "tests/batch/test_batch_refiner_modes.py": 11,
    "tests/test_architecture.py": 10,
    "tests/worker/test_lycoris.py": 10,
    "tests/batch/test_batch_embeddings.py": 9,
    "tests/worker/test_sampling_jobs.py": 9,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest test files first (a stable sort: tests keep their order within a file)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::")[0], 0))


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
def dev_inpaint_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev inpainting model as one single file: the dev base with a 9-channel UNet input (same VAE, encoders)."""
    from model_build.dev_model import write_dev_checkpoint

    return write_dev_checkpoint(tmp_path_factory.mktemp("checkpoint") / "sdxl-dev-inpaint.safetensors", inpainting=True)


@pytest.fixture(scope="session")
def dev_inpaint_model_dir(dev_inpaint_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev inpainting model, converted (fp16 on disk): loads with StableDiffusionXLInpaintPipeline."""
    from model_build.convert import convert

    output = tmp_path_factory.mktemp("models") / "sdxl-dev-inpaint"
    convert(dev_inpaint_checkpoint, output)
    return output


@pytest.fixture(scope="session")
def dev_controlnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev ControlNet (SDXL's ControlNet scaled to the dev UNet, random weights) as one original-layout file."""
    from model_build.dev_controlnet import write_dev_controlnet

    return write_dev_controlnet(tmp_path_factory.mktemp("controlnet-file") / "dev-controlnet.safetensors")


@pytest.fixture(scope="session")
def dev_controlnet_root(dev_controlnet_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CONTROLNET_DIR holding the dev ControlNet, converted, under the name ``dev-controlnet``."""
    from model_build.controlnet import convert_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    convert_controlnet(dev_controlnet_file, root / "dev-controlnet")
    return root


@pytest.fixture(scope="session")
def dev_ip_adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IP_ADAPTER_DIR in h94/IP-Adapter's layout with the dev IP-Adapters (SDXL's plain and plus kinds scaled to
    the dev UNet, random weights) and their two dev image encoders (model_build/dev_ip_adapter.py)."""
    from model_build.dev_ip_adapter import write_dev_ip_adapters

    root = tmp_path_factory.mktemp("ip-adapters")
    write_dev_ip_adapters(root)
    return root


@pytest.fixture(scope="session")
def dev_vpred_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev base's weights with the v_pred and ztsnr markers: a zero-terminal-SNR v-prediction checkpoint."""
    from model_build.dev_model import write_dev_checkpoint

    return write_dev_checkpoint(tmp_path_factory.mktemp("checkpoint") / "sdxl-dev-vpred.safetensors", v_prediction=True)


@pytest.fixture(scope="session")
def dev_vpred_model_dir(dev_vpred_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev v-prediction model, converted: its scheduler config says v_prediction, zero terminal SNR, trailing."""
    from model_build.convert import convert

    output = tmp_path_factory.mktemp("models") / "sdxl-dev-vpred"
    convert(dev_vpred_checkpoint, output)
    return output


@pytest.fixture(scope="session")
def worker_api_server(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The worker's local RunPod API server (``--rp_serve_api``) on a free loopback port; yields its base URL.

    It is started, not waited for: a first client retries until it listens.
    """
    with serve_worker_api(dev_model_dir, tmp_path_factory.mktemp("worker-api") / "worker.log") as url:
        yield url
