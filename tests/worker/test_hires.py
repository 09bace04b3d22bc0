"""The hires fix through the handler on the dev model: both passes in one job, A1111's fields, tiled VAE, refusals."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ImageQualityFailed
from core.settings import load_settings
from model_build.dev_lora import write_dev_lora
from worker.generation.decode import decode_latents
from worker.handler import Worker
from worker.output.images import read_parameters

# 128² first passes keep the dev model fast; VAE_TILE_PIXELS is low enough that the dev VAE (256-pixel tiles) tiles a
# 384² image and nothing smaller.
SMALL = {"prompt": "a lighthouse at dawn", "width": 128, "height": 128, "num_inference_steps": 2, "seed": 11}
HIRES = {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.6}
TILE_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    loras = tmp_path_factory.mktemp("hires-loras")
    write_dev_lora(dev_model_dir, loras / "style.safetensors", rank=4, seed=5)
    made = Worker(load_settings({"VAE_TILE_PIXELS": str(TILE_PIXELS), "LORA_DIR": str(loras)}))
    made.start(dev_model_dir)
    assert made.startup_error is None, made.startup_error
    return made


def run(worker: Worker, base: dict, **fields) -> dict:
    return worker.handle({"id": "hires-test", "input": {**base, **fields}})


def image(out: dict, index: int = 0) -> Image.Image:
    assert "error" not in out, out.get("error")
    return Image.open(io.BytesIO(base64.b64decode(out["images"][index].split(",", 1)[1])))


def pixels(out: dict, index: int = 0) -> np.ndarray:
    return np.asarray(image(out, index).convert("RGB"))


def test_one_job_runs_both_passes_and_says_what_ran(worker: Worker) -> None:
    out = run(worker, HIRES)
    assert image(out).size == (192, 192)
    metadata = out["metadata"]
    assert (metadata["width"], metadata["height"], metadata["num_inference_steps"]) == (192, 192, 2)
    hires = metadata["hires"]
    assert hires["first_pass"] == {"width": 128, "height": 128, "steps": 2}
    assert (hires["width"], hires["height"], hires["upscale_to"], hires["upscaler"]) == (192, 192, [192, 192], "Latent")
    # A1111: the 2 hires steps are the last 2 of an int(2 / 0.6) = 3-step schedule.
    assert (hires["steps"], hires["schedule_steps"], hires["denoising_strength"]) == (2, 3, 0.6)
    assert [stage.get("pass", stage["model"]) for stage in metadata["stages"]] == ["base", "hires"]
    assert metadata["vae_tiling"] == {"decode": False} and "vae_tiling" not in hires  # latents: no encode
    assert {"denoising_s", "hires_s", "hires_upscale_s", "vae_decode_s"} <= set(metadata["timings"])
    parameters = read_parameters(base64.b64decode(out["images"][0].split(",", 1)[1]))
    assert "Size: 128x128" in parameters  # A1111 writes the first pass's size, then the hires entries
    for entry in ("Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Latent"):
        assert entry in parameters
    assert np.array_equal(pixels(run(worker, HIRES)), pixels(out))  # same seed, same image


def test_the_hires_job_equals_the_txt2img_then_img2img_jobs_it_replaces(worker: Worker) -> None:
    """Upscaler "None" at hr_scale 1: the hires pass is img2img of the first pass's own image. A1111's 2 steps at
    denoising 0.5 are diffusers' img2img of 4 steps at strength 0.5, so the one job equals the two a user chained."""
    first = run(worker, SMALL)
    data_uri = first["images"][0]
    chained = run(worker, SMALL, image_url=data_uri, num_inference_steps=4, strength=0.5)
    hires = run(worker, HIRES, hr_scale=1.0, hr_upscaler="None", denoising_strength=0.5)
    assert hires["metadata"]["hires"]["vae_tiling"] == {"first_pass_decode_tiled": False, "encode_tiled": False}
    assert np.array_equal(pixels(hires), pixels(chained))


def test_every_upscaler_kind_runs_and_they_differ(worker: Worker) -> None:
    made = {}
    for upscaler in ("Latent (bicubic antialiased)", "Latent (nearest-exact)", "Nearest"):  # Latent, Lanczos: above
        out = run(worker, HIRES, hr_upscaler=upscaler)
        assert out["metadata"]["hires"]["upscaler"] == upscaler
        made[upscaler] = pixels(out).tobytes()
    assert len(set(made.values())) == len(made)


def test_resize_to_another_aspect_ratio_crops_like_a1111(worker: Worker) -> None:
    out = run(worker, HIRES, hr_resize_x=256, hr_resize_y=136, num_images=2)
    assert image(out, 1).size == (256, 136) and out["metadata"]["hires"]["upscale_to"] == [256, 256]
    odd = run(worker, HIRES, hr_resize_x=203)  # not a multiple of 8: A1111's latents end at 200
    assert image(odd).size == (200, 200)


def test_prompt_editing_is_scheduled_over_the_hires_steps(worker: Worker) -> None:
    """A1111's calculate_hr_conds: the hires pass's schedule spans its own steps, counted from its first call."""
    out = run(worker, HIRES, hr_second_pass_steps=4, hr_prompt="a [red:blue:0.5] barn", hr_sampler_name="Euler")
    hires = out["metadata"]["hires"]
    assert hires["sampler"] == "Euler" and hires["prompt"]["prompt"] == "a [red:blue:0.5] barn"
    texts = hires["prompt"]["schedule"]["texts"]
    assert [text["prompt"] for text in texts] == ["a red barn", "a blue barn"]
    (calls,) = hires["prompt"]["schedule"]["calls"]
    assert calls["model"] == "base" and [run["texts"] for run in calls["runs"]] == [0, 1]
    assert calls["runs"][0]["calls"] == [0, 2] and calls["runs"][1]["calls"] == [3, 3]
    assert "schedule" not in out["metadata"]["prompt"]  # the first pass's prompt has no editing
    parameters = read_parameters(base64.b64decode(out["images"][0].split(",")[1]))
    assert 'Hires prompt: "a [red:blue:0.5] barn"' in parameters  # A1111 quotes a text with ":"


def test_long_prompts_and_loras_carry_into_the_hires_pass(worker: Worker) -> None:
    long_prompt = ", ".join(["a very long prompt about a red lighthouse on a cliff"] * 12)
    plain = run(worker, HIRES, prompt=long_prompt)
    assert plain["metadata"]["prompt"]["num_chunks"] >= 2
    styled = run(worker, HIRES, prompt=long_prompt, loras=[{"name": "style", "scale": 0.8}])
    assert styled["metadata"]["loras"][0]["name"] == "style"
    assert not np.array_equal(pixels(styled), pixels(plain))


def test_the_vae_tiles_above_the_threshold_and_the_next_job_is_untouched(worker: Worker) -> None:
    before = run(worker, SMALL)
    out = run(worker, HIRES, hr_scale=3.0, hr_upscaler="Lanczos")  # 384²: over 300², a side over 256
    assert image(out).size == (384, 384)
    assert out["metadata"]["vae_tiling"] == {"decode": True}
    assert out["metadata"]["hires"]["vae_tiling"] == {"first_pass_decode_tiled": False, "encode_tiled": True}
    assert worker.engine.pipe.vae.use_tiling is False
    assert run(worker, SMALL)["images"] == before["images"]


def test_the_quality_guard_applies_to_tiled_decodes(worker: Worker) -> None:
    engine = worker.engine
    latents = torch.zeros(1, 4, 48, 48)
    latents[0, 0, 40, 40] = float("nan")  # in the last tile
    with pytest.raises(ImageQualityFailed, match="NaN"):
        decode_latents(engine.pipe, latents, None, (), TILE_PIXELS)
    assert engine.pipe.vae.use_tiling is False
    _, tiled = decode_latents(engine.pipe, torch.zeros(1, 4, 48, 48), None, (), TILE_PIXELS)
    assert tiled


BAD = [
    (
        {"width": 2048, "height": 2048, "hr_scale": 2.0},
        "hr_scale makes the hires pass 4096x4096 x 1 image(s) = 16777216 pixels, over this worker's budget of "
        "8388608 (MAX_JOB_PIXELS); the largest hr_scale for 2048x2048 x 1 image(s) is 1.41",
    ),
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler: unknown upscaler; use one of: Latent, Latent (antialiased)"),
    ({"hr_sampler_name": "Bogus"}, "hr_sampler_name: unknown sampler"),
    ({"hr_resize_x": 40}, "hr_resize_x makes the hires pass 40x40; each side must be at least 64"),
    ({"denoising_strength": 0.001}, "denoising_strength: 0.001 with hr_second_pass_steps 2 needs a 2000-step"),
    ({"image_url": "aGk="}, "enable_hr: the hires fix follows a text-to-image pass"),
]


def test_bad_hires_input_is_a_clear_error_and_changes_nothing(worker: Worker) -> None:
    before = run(worker, SMALL)
    for fields, message in BAD:
        out = run(worker, HIRES, **fields)
        assert message in out["error"], fields
    assert run(worker, SMALL)["images"] == before["images"]
