"""A 9-channel SDXL inpainting checkpoint as MODEL_DIR (the dev inpainting model): masked jobs read the mask and the
masked image through the UNet's extra channels, everything else is refused clearly, and its warm-up is a masked job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from core.errors import ConfigurationError
from core.settings import load_settings
from tests.support.dev_pipes import one_torch_thread
from tests.support.inpainting_images import JOB, data_uri, decoded, picture, rectangle
from worker.handler import Worker

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def worker(dev_inpaint_model_dir: Path) -> Worker:
    worker = Worker(load_settings({}))
    worker.start(dev_inpaint_model_dir)
    assert worker.startup_error is None, worker.startup_error
    assert worker.engine.pipe.unet.config.in_channels == 9
    return worker


def run(worker: Worker, **fields: Any) -> dict[str, Any]:
    job = {**JOB, "image_url": data_uri(picture()), "mask": data_uri(rectangle()), **fields}
    return worker.handle({"id": "inpaint-model", "input": {k: v for k, v in job.items() if v is not None}})


@pytest.mark.parametrize("fields", [{}, {"inpainting_fill": 2, "inpaint_full_res": False}], ids=["fill", "noise"])
def test_the_unet_reads_mask_and_masked_image_and_the_unmasked_pixels_stay(worker: Worker, fields: dict) -> None:
    inputs: list[torch.Tensor] = []
    handle = worker.engine.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(args[0] if args else kwargs["sample"]), with_kwargs=True
    )
    try:
        out = run(worker, **fields)
    finally:
        handle.remove()
    assert inputs and all(sample.shape[1] == 9 for sample in inputs)  # latents, mask, masked image's latents
    mask_channel = inputs[0][:, 4]
    assert 0 < mask_channel.mean() < 0.5 and set(mask_channel.unique().tolist()) == {0.0, 1.0}
    keep = np.asarray(rectangle().filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(decoded(out)[keep], np.asarray(picture())[keep])
    info = out["metadata"]["inpainting"]
    assert info["model"] == "inpainting" and info["fill"] == ("latent noise" if fields else "fill")


def test_jobs_without_a_mask_are_refused_and_change_nothing(worker: Worker) -> None:
    before = run(worker)
    for job in ({"prompt": "x", "width": 64, "height": 64}, {"prompt": "x", "image_url": data_uri(picture())}):
        out = worker.handle({"id": "no-mask", "input": job})
        assert out["error"].startswith("invalid input: mask: this worker serves sdxl-dev-inpaint, an SDXL inpainting")
    assert run(worker)["images"] == before["images"]


def test_the_warm_up_is_a_masked_job_and_leaves_no_trace(worker: Worker) -> None:
    before = run(worker)
    assert worker.engine.warm_up(steps=2, size=(64, 64)) > 0
    assert run(worker)["images"] == before["images"]


def test_compiling_an_inpainting_model_is_refused_at_start(dev_inpaint_model_dir: Path) -> None:
    from worker.generation.engine import Engine

    with pytest.raises(ConfigurationError, match="COMPILE / COMPILE_VAE: compiling is not available with an SDXL"):
        Engine(dev_inpaint_model_dir, settings=load_settings({"COMPILE": "unet"}))
