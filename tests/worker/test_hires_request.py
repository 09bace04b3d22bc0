"""The hires fix's fields and arithmetic, against A1111 1.10's rules (no model needed)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from core.errors import InvalidRequest
from worker.generation.hires import hires_schedule, hires_view, upscale_image, upscale_latents
from worker.request.hires import MAX_HR_SIDE, UPSCALERS
from worker.request.schema import parse_request

HIRES = {"prompt": "x", "enable_hr": True}


@pytest.mark.parametrize(
    ("fields", "upscale_to", "size"),
    [
        ({}, (2048, 2048), (2048, 2048)),  # A1111's API defaults: hr_scale 2
        ({"width": 832, "height": 1216, "hr_scale": 1.3}, (1081, 1580), (1080, 1576)),  # int(), then x8 latents
        ({"hr_resize_x": 1536}, (1536, 1536), (1536, 1536)),  # one side: the other keeps the aspect ratio
        ({"width": 1216, "height": 832, "hr_resize_y": 1001}, (1463, 1001), (1456, 1000)),
        # Both sides at another aspect ratio: upscale to cover, crop the latents' middle (truncate_y = 105).
        ({"hr_resize_x": 1920, "hr_resize_y": 1080}, (1920, 1920), (1920, 1080)),
        ({"width": 768, "height": 1024, "hr_resize_x": 1024, "hr_resize_y": 1024}, (1024, 1365), (1024, 1024)),
    ],
)
def test_hires_size_follows_a1111(fields: dict, upscale_to: tuple[int, int], size: tuple[int, int]) -> None:
    request = parse_request({**HIRES, **fields})
    assert request.hires.upscale_to == upscale_to and request.hires.size == size


@given(
    width=st.integers(8, 256).map(lambda n: n * 8),
    height=st.integers(8, 256).map(lambda n: n * 8),
    images=st.integers(1, 8),
    scale=st.integers(100, 400).map(lambda n: n / 100),
    budget=st.integers(64 * 64, 8 * 4096 * 4096),
)
def test_the_pixel_budget_counts_the_hires_size(width: int, height: int, images: int, scale: float, budget: int):
    """A hires job runs exactly when its second pass fits the budget; a refusal names hr_scale and a largest value
    that does fit (and is the largest, to the hundredth)."""
    payload = {**HIRES, "width": width, "height": height, "num_images": images, "hr_scale": scale}
    if width * height * images > budget:
        return  # the first pass alone is over: the plain budget error (tested with the schema)
    try:
        request = parse_request(payload, max_job_pixels=budget)
    except InvalidRequest as error:
        message = str(error)
        assert message.startswith("invalid input: hr_scale makes the hires pass"), message
        if "budget" not in message:
            assert f"at most {MAX_HR_SIDE}" in message
            return
        largest = float(re.search(r"the largest hr_scale for .* is ([0-9.]+)", message).group(1))
        fits = parse_request({**payload, "hr_scale": largest}, max_job_pixels=budget)
        w, h = fits.hires.size
        assert w * h * images <= budget and largest < scale
        if largest < 4.0:
            with pytest.raises(InvalidRequest, match="hr_scale"):
                parse_request({**payload, "hr_scale": round(largest + 0.01, 2)}, max_job_pixels=budget)
    else:
        w, h = request.hires.size
        assert w * h * images <= budget and max(w, h) <= MAX_HR_SIDE


def test_hr_resize_beyond_the_budget_names_the_fields_and_a_size_that_fits() -> None:
    with pytest.raises(InvalidRequest, match=r"hr_resize_x/hr_resize_y makes the hires pass 4000x4000") as error:
        parse_request({**HIRES, "hr_resize_x": 4000, "hr_resize_y": 4000})
    assert "about 2896x2896" in str(error.value) and "MAX_JOB_PIXELS" in str(error.value)
    with pytest.raises(InvalidRequest, match=r"hr_resize_x makes the hires pass 64x16; each side must be at least"):
        parse_request({**HIRES, "width": 1024, "height": 256, "hr_resize_x": 64})


def test_upscalers_are_a1111s_names_and_models_are_refused_by_name() -> None:
    assert parse_request(HIRES).hr_upscaler == "Latent"
    assert parse_request({**HIRES, "hr_upscaler": None}).hr_upscaler == "Latent"  # A1111's null: its default mode
    assert parse_request({**HIRES, "hr_upscaler": "latent (BICUBIC  antialiased)"}).hr_upscaler == (
        "Latent (bicubic antialiased)"
    )
    for name in ("R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR 4x", "Bicubic"):
        with pytest.raises(InvalidRequest) as error:
            parse_request({**HIRES, "hr_upscaler": name})
        message = str(error.value)
        assert message.startswith("invalid input: hr_upscaler: unknown upscaler; use one of: Latent, ")
        assert all(upscaler in message for upscaler in UPSCALERS) and "not available" in message


def test_hires_sampler_and_prompts() -> None:
    assert parse_request({**HIRES, "hr_sampler_name": "Use same sampler"}).hr_sampler_name is None
    assert parse_request({**HIRES, "hr_sampler_name": "k_euler_ancestral"}).hr_sampler_name == "Euler a"
    with pytest.raises(InvalidRequest, match="hr_sampler_name: unknown sampler"):
        parse_request({**HIRES, "hr_sampler_name": "Bogus"})
    with pytest.raises(InvalidRequest, match="hr_scheduler: unknown schedule type"):
        parse_request({**HIRES, "hr_scheduler": "Bogus"})
    view = hires_view(parse_request({**HIRES, "negative_prompt": "n", "hr_prompt": "", "num_inference_steps": 9}))
    assert (view.prompt, view.negative_prompt, view.num_inference_steps, view.scheduler) == ("x", "n", 9, "DDIM")
    other = parse_request({**HIRES, "hr_prompt": "h", "hr_negative_prompt": "hn", "hr_second_pass_steps": 4})
    assert (hires_view(other).prompt, hires_view(other).negative_prompt, hires_view(other).num_inference_steps) == (
        "h",
        "hn",
        4,
    )


@pytest.mark.parametrize(
    ("fields", "sampler", "schedule"),
    [
        ({"scheduler": "DDIM", "hr_sampler_name": "Euler a"}, "Euler a", "model config"),  # official style: as sent
        ({"sampler_name": "DPM++ 2M", "scheduler": "Karras", "hr_sampler_name": "Euler"}, "Euler", "Karras"),
        ({"sampler_name": "Euler", "hr_scheduler": "Exponential"}, "Euler", "Exponential"),  # A1111's hr_scheduler
        ({"hr_sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),  # a combined name splits as in A1111
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "Euler", "Karras"),  # neither: the first pass's
    ],
)
def test_the_hires_sampler_follows_a1111_1_10(fields: dict, sampler: str, schedule: str) -> None:
    sampling = hires_view(parse_request({**HIRES, **fields})).sampling
    assert (sampling.sampler, sampling.schedule) == (sampler, schedule)


def test_a_hires_sampler_pair_that_does_not_exist_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequest, match="hr_sampler_name/hr_scheduler: the hires pass would run DDIM with Karras"):
        parse_request({**HIRES, "sampler_name": "Euler", "scheduler": "Karras", "hr_sampler_name": "DDIM"})
    with pytest.raises(InvalidRequest, match="names the Karras schedule but hr_scheduler asks for 'Exponential'"):
        parse_request({**HIRES, "hr_sampler_name": "DPM++ 2M Karras", "hr_scheduler": "Exponential"})


def test_hires_refuses_img2img_and_img2img_refuses_denoising_strength() -> None:
    with pytest.raises(InvalidRequest, match="enable_hr: the hires fix follows a text-to-image pass"):
        parse_request({**HIRES, "image_url": "aGk="})
    with pytest.raises(InvalidRequest, match="denoising_strength: is the hires pass's strength"):
        parse_request({"prompt": "x", "image_url": "aGk=", "denoising_strength": 0.5})
    # A1111 clients send hires fields with enable_hr off: accepted, and nothing hires runs.
    assert not parse_request({"prompt": "x", "hr_scale": 2, "denoising_strength": 0.7}).enable_hr
    with pytest.raises(InvalidRequest, match=r"denoising_strength: .*allowed >0..1|denoising_strength: Input should"):
        parse_request({**HIRES, "denoising_strength": 0})


@given(steps=st.integers(1, 150), strength=st.floats(0.01, 1.0))
def test_the_hires_schedule_runs_a1111s_steps_from_a1111s_start(steps: int, strength: float) -> None:
    """A1111's hires pass runs exactly hr steps, the last ones of a steps / strength schedule (setup_img2img_steps:
    sigma_sched = sigmas[N - t_enc - 1:], t_enc = steps - 1); diffusers' img2img, given this N and strength, runs
    the same steps from the same index of its own N-step schedule."""
    total, pipeline_strength = hires_schedule(steps, strength)
    assert total == int(steps / min(strength, 0.999)) and 0 < pipeline_strength <= 1
    if total > 1000:
        return  # refused by the engine (check_hires): more steps than the model has timesteps
    scheduler = EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(total, device="cpu")
    all_timesteps = scheduler.timesteps.clone()
    holder = SimpleNamespace(scheduler=scheduler)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(holder, total, pipeline_strength, "cpu")
    assert len(timesteps) == steps and timesteps[0] == all_timesteps[total - steps]


def test_latent_upscalers_interpolate_as_a1111_and_crop_the_middle() -> None:
    latents = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    nearest = parse_request({**HIRES, "width": 32 * 8, "height": 32 * 8, "hr_upscaler": "Latent (nearest)"})
    request = nearest.model_copy(update={"width": 32, "height": 32})  # 4x4 latents, hr_scale 2: 8x8
    doubled = latents.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(upscale_latents(latents, request), doubled)
    cropped = request.model_copy(update={"hr_resize_x": 64, "hr_resize_y": 48})  # cover 64x64, keep rows 1..6
    assert request.model_copy(update={"hr_resize_x": 64, "hr_resize_y": 48}).hires.latent_box == (0, 1, 8, 7)
    assert torch.equal(upscale_latents(latents, cropped), doubled[:, :, 1:7, :])


@pytest.mark.parametrize("upscaler", ["None", "Lanczos", "Nearest"])
def test_pixel_upscalers_give_the_second_pass_size(upscaler: str) -> None:
    request = parse_request({**HIRES, "width": 832, "height": 1216, "hr_scale": 1.3, "hr_upscaler": upscaler})
    image = Image.new("RGB", (832, 1216), (200, 30, 40))
    upscaled = upscale_image(image, request)
    assert upscaled.size == request.hires.size == (1080, 1576)
    assert upscaled.getpixel((500, 700)) == (200, 30, 40)
    nearest = parse_request({**HIRES, "width": 64, "height": 64, "hr_upscaler": "Nearest"})
    checker = Image.fromarray(((torch.arange(64)[:, None] + torch.arange(64)) % 2 * 255).to(torch.uint8).numpy())
    assert upscale_image(checker.convert("RGB"), nearest) == checker.convert("RGB").resize((128, 128), Image.NEAREST)
