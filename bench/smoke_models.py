"""The smoke's other model folders (bench/smoke.py): a v-prediction model and a 9-channel inpainting model, each
random at the smoke's size, saved as converted folders and served as MODEL_DIR by a worker of its own.

The v-prediction folder holds the base's random weights with the scheduler config and manifest the converter writes
for ``--prediction-type v_prediction --zero-terminal-snr`` (:mod:`model_build.prediction`); the inpainting folder is
the inpainting family's config (``sdxl_inpaint``, or ``dev_inpaint`` for the dry run) with random weights. One worker
holds the GPU at a time: the caller drops the last one and :func:`free_gpu` empties the cache before the next starts.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

import torch

from bench.smoke_inpainting import run_job


def v_prediction() -> Any:
    """What the converter decides for ``--prediction-type v_prediction --zero-terminal-snr``."""
    from model_build.prediction import decide_prediction

    return decide_prediction((), prediction_type="v_prediction", zero_terminal_snr=True)


def save_vpred_folder(pipe: Any, destination: Path) -> Path:
    from bench.fullsize import save_as_model_dir

    return save_as_model_dir(pipe, destination, prediction=v_prediction())


def build_inpaint_folder(destination: Path, full_size: bool, device: str, dtype: torch.dtype) -> Path:
    """A random 9-channel inpainting model, saved as a converted folder of the inpainting family."""
    from bench.fullsize import build_random_pipeline, save_as_model_dir

    config = "sdxl_inpaint" if full_size else "dev_inpaint"
    pipe = build_random_pipeline(config, device, dtype)
    try:
        return save_as_model_dir(pipe, destination, config=config)
    finally:
        del pipe
        free_gpu(device)


def free_gpu(device: str) -> float | None:
    """Collect what the last worker left and give the cache back; the GiB still allocated (None on the CPU).

    Dynamo's caches are reset too: with ``COMPILE`` a compiled UNet's graphs (frozen: its weights as constants) hang
    off ``forward``'s code object, which outlives the worker.
    """
    torch._dynamo.reset()
    gc.collect()
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def start_worker(settings: Any, model_dir: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """A worker serving ``model_dir`` (None if it did not start), once the last one's memory is given back, and what
    its start took (with the GPU memory still allocated before it: the last worker's, if any was left)."""
    from worker.handler import Worker

    left = free_gpu(device)
    started = time.perf_counter()
    worker = Worker(settings)
    worker.start(model_dir)
    details = {"start_seconds": round(time.perf_counter() - started, 1), "gpu_gib_allocated_before_start": left}
    if worker.engine is None:
        return None, {**details, "error": f"start: {worker.startup_error}"}
    return worker, details


def without_compile(settings: Any) -> tuple[Any, str | None]:
    """The settings an inpainting model can start with: the worker refuses COMPILE / COMPILE_VAE for one (diffusers'
    inpainting pipeline is not compiled by this worker), so they are turned off, and the note says so."""
    if settings.compile == "off" and not settings.compile_vae:
        return settings, None
    note = f"COMPILE={settings.compile} COMPILE_VAE={int(settings.compile_vae)} turned off: refused for this model"
    return dataclasses.replace(settings, compile="off", compile_vae=False), note


def vpred_checks(
    worker: Any, base: dict[str, Any], first: dict[str, Any], same_weights: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a worker serving the v-prediction folder: the square job runs on its config (v_prediction, zero terminal
    SNR, so it starts at timestep 999) and, with the main model's weights (``same_weights``), differs from the main
    model's image; then the README's v-prediction request (Euler a, guidance_rescale 0.7), and Heun refused."""
    output, seconds = run_job(worker, "v-prediction", **base, seed=7)
    metadata = output.get("metadata", {})
    sampling = metadata.get("sampling", {})
    timesteps = metadata.get("stages", [{}])[0].get("timesteps") or []
    differs = "error" not in output and "error" not in first and output["images"][0] != first["images"][0]
    plain = {
        "ok": "error" not in output
        and sampling.get("prediction_type") == "v_prediction"
        and sampling.get("rescale_betas_zero_snr") is True
        and timesteps[:1] == [999]
        and (differs or not same_weights),
        "seconds": round(seconds, 2),
        "error": output.get("error"),
        "sampling": sampling,
        "timesteps": timesteps,
        "differs_from_epsilon_folder": differs if same_weights else None,
        "timings": metadata.get("timings"),
    }
    fields = {"sampler_name": "Euler a", "guidance_scale": 5, "guidance_rescale": 0.7}
    rescaled, seconds = run_job(worker, "v-prediction-rescale", **base, **fields, seed=7)
    heun, _ = run_job(worker, "v-prediction-heun", **base, sampler_name="Heun", seed=7)
    heun_refused = str(heun.get("error", "")).startswith("invalid input: sampler_name:")
    sampling = rescaled.get("metadata", {}).get("sampling", {})
    rescale = {
        "ok": "error" not in rescaled and sampling.get("prediction_type") == "v_prediction" and heun_refused,
        "seconds": round(seconds, 2),
        "error": rescaled.get("error"),
        "sampling": sampling,
        "heun_refused": heun_refused,
        "heun_error": heun.get("error"),
    }
    return plain, rescale
