"""The hires fix's second pass, as A1111 1.10's ``StableDiffusionProcessingTxt2Img.sample_hr_pass`` runs it.

After the text-to-image pass: upscale (a latent interpolation, or decode -> A1111's pixel resize -> encode again),
crop the middle when both hr_resize sides are given, then img2img on the base model through the img2img stage
(:meth:`.stages.StageRunner.img2img_call`) with:

- steps: A1111 passes ``steps = hr_second_pass_steps or steps`` to ``sample_img2img``, which then runs exactly that
  many steps on a schedule of ``int(steps / min(denoising_strength, 0.999))`` (``setup_img2img_steps``): the
  schedule is stretched, the step count kept. diffusers' img2img runs ``int(N x strength)`` of N; this module gives
  it that N and the strength that makes it run exactly the requested steps from the same schedule index.
- noise: fresh generators from the images' own seeds (A1111 makes a new ``ImageRNG`` from the same seeds).
- conditioning: ``hr_prompt`` / ``hr_negative_prompt`` (or the first pass's prompts) with the prompt-editing schedule
  computed over the hires pass's own steps and counted from its first call (A1111's ``calculate_hr_conds``); SDXL's
  size conditioning is the upscale target (A1111 builds the hires conds with ``hr_upscale_to_x`` / ``_y``).
- the sampler: ``hr_sampler_name`` and ``hr_scheduler`` (A1111 1.10), or the first pass's.

The pass is described by a request of its own (:func:`hires_view`), so encoding, grouping, the refiner and
metadata treat it as they treat any request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from core.errors import InternalError, InvalidRequest
from worker.adapters.lora.manager import AppliedLora
from worker.generation.conditioning import Embeddings, Stage
from worker.generation.metadata import describe_schedule_calls
from worker.generation.stages import ProgressCallback, StageRunner
from worker.prompting.encoding import EncodedPrompts
from worker.prompting.stepping import SAME_STEPS
from worker.request.hires import LATENT_FACTOR, LATENT_UPSCALERS, hires_sampling_fields
from worker.request.schema import GenerationRequest

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
_PIXEL_FILTERS = {"Lanczos": LANCZOS, "Nearest": NEAREST}


def hires_view(request: GenerationRequest) -> GenerationRequest:
    """The hires pass as a request: its prompts, steps, scheduler and size (never validated again: it is derived)."""
    width, height = request.hires.size
    sampler_name, scheduler = hires_sampling_fields(request)
    same_sampler = (sampler_name, scheduler) == (request.sampler_name, request.scheduler)
    return request.model_copy(
        update={
            "prompt": request.hr_prompt if request.hr_prompt is not None else request.prompt,
            "negative_prompt": request.hr_negative_prompt or request.negative_prompt,
            "num_inference_steps": request.hr_steps,
            "sampler_name": sampler_name,
            "scheduler": scheduler,
            # A request's own timesteps or sigmas are one per first-pass step; the hires pass runs a schedule.
            "timesteps": None,
            "sigmas": None,
            "eta": request.eta if same_sampler else None,
            "width": width,
            "height": height,
            "enable_hr": False,
            "high_noise_frac": None,  # a refiner after the hires pass refines its result at strength
        }
    )


def hires_schedule(steps: int, denoising_strength: float) -> tuple[int, float]:
    """(N, strength) for diffusers' img2img so that it runs exactly ``steps`` steps, the last of an N-step schedule,
    as A1111 1.10's ``setup_img2img_steps`` does for the hires pass."""
    total = int(steps / min(denoising_strength, 0.999))
    strength = steps / total
    while min(int(total * strength), total) < steps:  # a float just under steps / total would run one step fewer
        strength = math.nextafter(strength, math.inf)
    return total, min(strength, 1.0)


def check_hires(request: GenerationRequest, scheduler_config: dict[str, Any]) -> None:
    """Refuse a hires schedule longer than the model's training timesteps (a tiny strength stretches it)."""
    total, _ = hires_schedule(request.hr_steps, request.denoising_strength)
    limit = int(scheduler_config.get("num_train_timesteps", 1000))
    if total > limit:
        steps_field = "hr_second_pass_steps" if request.hr_second_pass_steps else "num_inference_steps"
        raise InvalidRequest(
            f"denoising_strength: {request.denoising_strength:g} with {steps_field} {request.hr_steps} needs a "
            f"{total}-step schedule (A1111 runs the hires pass's steps on a schedule of steps / denoising_strength), "
            f"more than the model's {limit} timesteps; raise denoising_strength or lower {steps_field}"
        )


def upscale_latents(latents: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    """A1111's latent upscale: ``interpolate`` to the target's latent size, then its middle crop."""
    mode, antialias = LATENT_UPSCALERS[request.hr_upscaler]
    width, height = request.hires.upscale_to
    size = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    upscaled = torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)
    left, top, right, bottom = request.hires.latent_box
    return upscaled[:, :, top:bottom, left:right]


def upscale_image(image: Image.Image, request: GenerationRequest) -> Image.Image:
    """A1111 1.10's ``images.resize_image(0, image, w, h, upscaler_name)`` for its built-in upscalers, then the crop
    its latents get (in pixels: the 8 x 8 blocks of the kept latents; the VAE encodes each block into its latent)."""
    width, height = request.hires.upscale_to
    name = request.hr_upscaler
    scale = max(width / image.width, height / image.height)
    if name in _PIXEL_FILTERS and scale > 1.0:  # Upscaler.upscale: one do_upscale pass, then a multiple of 8
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=_PIXEL_FILTERS[name])
        if image.size != dest:
            image = image.resize(dest, resample=LANCZOS)
    if image.size != (width, height):  # "None", a scale <= 1, and the last step of the others
        image = image.resize((width, height), resample=LANCZOS)
    left, top, right, bottom = request.hires.latent_box
    return image.crop((left * LATENT_FACTOR, top * LATENT_FACTOR, right * LATENT_FACTOR, bottom * LATENT_FACTOR))


def offset_progress(progress: ProgressCallback | None, done_before: int, total: int) -> ProgressCallback | None:
    """A stage's progress (steps done of its own count) as the job's (after ``done_before`` steps, of ``total``)."""
    if progress is None:
        return None
    return lambda done, _own_total: progress(min(total, done_before + done), total)


@dataclass
class HiresRun:
    """What the hires pass made and what it reports."""

    latents: torch.Tensor
    views: list[GenerationRequest]  # each request's hires pass as a request
    encoded: list[EncodedPrompts]
    embeds: Embeddings
    stage: Stage
    info: dict[str, Any]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.views[0].width, self.views[0].height

    def describe(self, index: int, later: Sequence[Stage] = ()) -> dict[str, Any]:
        """Request ``index``'s hires metadata; its prompt facts when they differ from the first pass's (another
        prompt, or prompt editing, which the hires pass schedules over its own steps: ``calls`` says which text
        each model call of the pass and of ``later`` stages read)."""
        info = dict(self.info)
        request, encoded = self.views[index], self.encoded[index]
        if encoded.is_scheduled or request.hr_prompt is not None or request.hr_negative_prompt is not None:
            describe_schedule_calls(encoded, [self.stage, *later])
            prompt = dict(encoded.info)
            prompt.pop("cache_hit", None)
            info["prompt"] = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, **prompt}
        return info


class HiresPass:
    """Runs the second pass for a group of text-to-image requests that share one pipeline call."""

    def __init__(
        self,
        stages: StageRunner,
        encode: Callable[[GenerationRequest], EncodedPrompts],
        decode: Callable[[torch.Tensor, Sequence[AppliedLora]], tuple[list[Image.Image], bool]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stages, self.encode, self.decode, self.clock = stages, encode, decode, clock

    def check(self, request: GenerationRequest) -> None:
        """What the schema cannot know: the stretched schedule against the model's timesteps, the hires sampler
        against the model's scheduler config; and ControlNets, which the hires pass does not take yet."""
        if request.controlnets:
            raise InvalidRequest(
                "controlnets: with enable_hr, ControlNets would guide the first pass and not the hires pass, which "
                "does not take them yet; send the job without enable_hr or without controlnets"
            )
        check_hires(request, self.stages.scheduler_config)
        self.stages.schedules.check_sampling(hires_view(request), False)

    def run(
        self,
        embeds: Embeddings,
        latents: torch.Tensor,
        seeds: list[int],
        progress: ProgressCallback | None,
        loras: Sequence[AppliedLora] = (),
    ) -> HiresRun:
        """The second pass over ``latents``, the first pass of the requests of ``embeds`` (their conditioning)."""
        requests = embeds.requests
        first = requests[0]
        started = self.clock()
        views = [hires_view(request) for request in requests]
        encoded = [self.encode(view) for view in views]
        if len({prompts.num_chunks for prompts in encoded}) != 1:
            raise InternalError("requests whose hires prompts differ in shape cannot share one pipeline call")
        hires_embeds = Embeddings(encoded, views, embeds.cfg, image_prompt=embeds.image_prompt)  # A1111: both passes
        info: dict[str, Any] = {}
        if first.hr_upscaler in LATENT_UPSCALERS:
            image: list[Image.Image] | torch.Tensor = upscale_latents(latents, first)
        else:
            decoded, tiled = self.decode(latents, loras)  # the quality guard applies to the first pass's image too
            image = [upscale_image(picture, first) for picture in decoded]
            info["first_pass_decode_tiled"] = tiled
        upscaled = self.clock()
        total, strength = hires_schedule(first.hr_steps, first.denoising_strength)
        stage = Stage("base", total, views[0].sampling.sampler, SAME_STEPS, name="hires")
        target_width, target_height = first.hires.upscale_to
        latents, encode_tiled = self.stages.img2img_call(
            views[0],
            hires_embeds,
            seeds,
            image,
            strength,
            stage,
            progress,
            size_conditioning=(target_height, target_width),
        )
        if encode_tiled is not None:
            info["encode_tiled"] = encode_tiled
        width, height = views[0].width, views[0].height
        described = {
            "first_pass": {"width": first.width, "height": first.height, "steps": first.num_inference_steps},
            "width": width,
            "height": height,
            "upscale_to": list(first.hires.upscale_to),  # A1111's target before its crop and the multiple of 8
            "upscaler": first.hr_upscaler,
            "denoising_strength": first.denoising_strength,
            "sampler": views[0].sampling.sampler,
            "schedule": views[0].sampling.schedule,
            "hr_second_pass_steps": first.hr_second_pass_steps,
            "schedule_steps": total,  # the stretched schedule the pass runs the end of
            "steps": stage.steps_run,
            "model_calls": stage.counter.calls,
        }
        if info:
            described["vae_tiling"] = info
        times = {"hires_upscale_s": upscaled - started, "hires_s": self.clock() - started}
        return HiresRun(latents, views, encoded, hires_embeds, stage, described, times)
