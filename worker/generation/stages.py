"""The pipeline calls of a job: text to latents on the base, the refiner after it, img2img on either, inpainting.

Each takes the request, the group's conditioning (:class:`.conditioning.Embeddings`), the images' seeds and a
progress callback, runs one diffusers pipeline call with a fresh scheduler built from the model's own config
(a pipeline's current scheduler is the previous job's), and returns the latents with the stage's record.
:class:`StageRunner` holds only what every call needs: the pipelines, where they run, the schedulers' configs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from core.errors import InvalidRequest
from core.settings import Settings
from worker.adapters.controlnet.manager import ControlInputs
from worker.generation.conditioning import Embeddings, Stage
from worker.generation.inpainting import InpaintPlan, latent_start
from worker.generation.seeds import refiner_seed
from worker.generation.stage_schedules import StageSchedules, img2img_calls
from worker.generation.vae_tiling import vae_tiling
from worker.model.placement import Placement
from worker.prompting.stepping import SAME_STEPS, CallCounter, StageSteps, pipeline_callback_kwargs
from worker.request.fields import MIN_SIDE, SIDE_MULTIPLE
from worker.request.input_images import load_input_image
from worker.request.samplers import calls_per_step, schedule_steps
from worker.request.schema import GenerationRequest

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


def _unet_context(control: ControlInputs | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if control is None else control.unet_context()


def stage_callbacks(embeds: Embeddings, progress_callback: Any, stage: Stage) -> dict[str, Any]:
    """A pipeline call's step callback: it counts the stage's model calls, reports progress and switches edited
    prompts' conditioning at the schedule steps the stage's calls map to."""
    images = [request.num_images for request in embeds.requests]
    stage.counter = CallCounter(progress_callback)
    return pipeline_callback_kwargs(
        embeds.encoded, images, embeds.cfg, stage.counter, stage.steps, embeds.first_feature
    )


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def step_callback(progress: ProgressCallback | None, done_before: int, total: int, per_step: int = 1) -> Any:
    """Reports steps, not model calls: diffusers calls back after every model call, and the second-order
    schedulers make two per step (Heun's 4 steps are 7 calls)."""
    if progress is None:
        return None

    def callback(pipe: Any, call: int, timestep: Any, tensors: dict) -> dict:
        progress(min(total, done_before + call // per_step + 1), total)
        return tensors

    return callback


def img2img_size(request: GenerationRequest, source_size: tuple[int, int]) -> tuple[int, int]:
    """The output size: the request's, or the input image's rounded down to a multiple of 8."""
    if request.size_given:
        return request.width, request.height
    width, height = (side - side % SIDE_MULTIPLE for side in source_size)
    if min(width, height) < MIN_SIDE or max(width, height) > 2048:
        raise InvalidRequest(
            f"image_url: the image is {source_size[0]}x{source_size[1]}; without width/height the output "
            f"follows it, which must be {MIN_SIDE}..2048 a side: give width and height to resize it"
        )
    return width, height


class StageRunner:
    """Runs the stages of a job on loaded pipelines: the base, its img2img and inpainting twins on the same modules,
    the refiner."""

    def __init__(
        self, pipe: Any, img2img: Any, inpaint: Any, refiner: Any | None, placement: Placement, settings: Settings
    ) -> None:
        self.pipe, self.img2img_pipe, self.inpaint_pipe, self.refiner = pipe, img2img, inpaint, refiner
        self.placement, self.settings = placement, settings
        self.schedules = StageSchedules(dict(pipe.scheduler.config), refiner)
        self.scheduler_config = self.schedules.base_config

    def _total_steps(self, request: GenerationRequest, refine: bool) -> int:
        base = request.num_inference_steps
        if not refine or request.is_img2img:
            return base
        return base + request.refiner_inference_steps

    def text_to_latents(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        refine: bool,
        progress: ProgressCallback | None,
        stage: Stage,
        control: ControlInputs | None = None,
    ) -> torch.Tensor:
        """The base's text-to-image call; with ``control``, diffusers' ControlNet pipeline over the same modules."""
        pipe = self.placement.use(self.pipe if control is None else control.pipeline(self.pipe, img2img=False))
        schedule = self.schedules.base(request, request.num_inference_steps, seeds[0])
        pipe.scheduler = schedule.scheduler
        stage.spacing = schedule.spacing
        arguments = {
            **embeds.base(),
            **schedule.call_kwargs(),
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.num_inference_steps,
            "denoising_end": request.high_noise_frac if refine else None,
            "guidance_scale": request.guidance_scale,
            "guidance_rescale": request.guidance_rescale,
            "generator": seeded_generators(seeds),
            "output_type": "latent",
        }
        if control is not None:
            control.check_arguments(pipe, arguments)  # what the ControlNet pipeline lacks is refused, not dropped
            arguments.update(control.call_kwargs((request.width, request.height), img2img=False))
        with _unet_context(control):
            return pipe(
                **arguments,
                **stage_callbacks(
                    embeds,
                    step_callback(
                        progress, 0, self._total_steps(request, refine), calls_per_step(request.sampling.sampler)
                    ),
                    stage,
                ),
            ).images

    def refine(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        latents: torch.Tensor,
        seeds: list[int],
        progress: ProgressCallback | None,
        prompt_schedule_steps: int,
    ) -> tuple[torch.Tensor, Stage]:
        """The official worker's second stage: the refiner continues from the base's latents.

        With ``high_noise_frac`` the two models split one noise schedule (ensemble of experts: the base stops
        at that fraction, the refiner starts there); without it the refiner runs img2img at ``strength`` over
        the finished base latents, exactly as the official worker does. Either way the refiner's calls continue
        the prompt-editing schedule where its own schedule stands (:mod:`worker.prompting.stepping`).
        """
        refiner = self.placement.use(self.refiner)
        schedule = self.schedules.refiner(request, seeds[0])
        refiner.scheduler = schedule.scheduler
        steps = request.refiner_inference_steps
        _, skipped = img2img_calls(type(refiner), schedule, steps, request.strength, request.high_noise_frac)
        sampler = request.sampling.sampler
        mapping = StageSteps(skipped, prompt_schedule_steps, schedule_steps(sampler, steps))
        stage = Stage("refiner", steps, sampler, mapping, spacing=schedule.spacing)
        latents = refiner(
            **embeds.at(mapping.schedule_step(0)),
            **schedule.call_kwargs(),
            image=latents,
            num_inference_steps=steps,
            denoising_start=request.high_noise_frac,
            strength=request.strength,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            generator=seeded_generators([refiner_seed(seed) for seed in seeds]),
            output_type="latent",
            **stage_callbacks(
                embeds,
                step_callback(
                    progress,
                    request.num_inference_steps,
                    self._total_steps(request, True),
                    calls_per_step(request.sampling.sampler),
                ),
                stage,
            ),
        ).images
        return latents, stage

    def img2img(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        refine: bool,
        progress: ProgressCallback | None,
        control: ControlInputs | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int], list[dict[str, Any]], list[Stage]]:
        """img2img on the base's own modules (with ``control``, diffusers' ControlNet img2img pipeline over them), or
        through the refiner (``embeds`` are then the refiner's; the schema refuses ControlNets there). Each request
        of the call (``embeds.requests``) starts from its own picture: pictures of any size share a call once
        width/height fix the output (:func:`.grouping.fields_key`). Returns each request's mode metadata."""
        requests = embeds.requests
        sources = {
            url: load_input_image(url, self.settings) for url in dict.fromkeys(r.image_url or "" for r in requests)
        }
        size = img2img_size(request, sources[request.image_url or ""].size)  # one per call: the group key's
        resized = {
            url: source if source.size == size else source.resize(size, Image.Resampling.LANCZOS)
            for url, source in sources.items()
        }
        images = [resized[r.image_url or ""] for r in requests for _ in range(r.num_images)]
        steps = request.refiner_inference_steps if refine else request.num_inference_steps
        # A1111's img2img: the schedule spans the requested steps and its counter starts at the first call that runs.
        stage = Stage("refiner" if refine else "base", steps, request.sampling.sampler, SAME_STEPS)
        latents, encode_tiled = self.img2img_call(
            request, embeds, seeds, images, request.strength, stage, progress, refine, control=control
        )
        infos = [
            {
                "mode": "img2img",
                "img2img": {
                    "strength": request.strength,
                    "input_size": list(sources[r.image_url or ""].size),
                    "model": stage.model,
                    "num_inference_steps": steps,  # the schedule strength cuts: int(steps x strength) of it ran
                    "steps": stage.steps_run,
                },
                "vae_tiling": {"encode": encode_tiled},
            }
            for r in requests
        ]
        return latents, size, infos, [stage]

    def img2img_call(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        image: list[Image.Image] | torch.Tensor,
        strength: float,
        stage: Stage,
        progress: ProgressCallback | None,
        refine: bool = False,
        size_conditioning: tuple[int, int] | None = None,
        control: ControlInputs | None = None,
    ) -> tuple[torch.Tensor, bool | None]:
        """One img2img pipeline call: a schedule of ``stage.num_inference_steps`` steps from ``request``'s sampler,
        cut at ``strength``, over ``image`` (PIL images, encoded by the VAE, in tiles above VAE_TILE_PIXELS; or
        latents, used as they are), on the base's modules or the refiner; ``size_conditioning`` (height, width)
        replaces SDXL's original/target-size conditioning. The img2img mode and the hires pass both run here.
        Returns the latents and whether the VAE encode was tiled (None: latents need no encode)."""
        if control is not None and not refine:
            pipe = self.placement.use(control.pipeline(self.img2img_pipe, img2img=True))
        else:
            pipe = self.placement.use(self.refiner if refine else self.img2img_pipe)
        steps = stage.num_inference_steps
        # A fresh scheduler from the model's own config (the pipeline's current one is the previous job's).
        if refine:
            schedule = self.schedules.refiner(request, seeds[0])
        else:
            schedule = self.schedules.base(request, steps, seeds[0])
        pipe.scheduler = schedule.scheduler
        stage.spacing = schedule.spacing
        arguments = {
            **embeds.at(0),
            **schedule.call_kwargs(),
            "image": image,
            "strength": strength,
            "num_inference_steps": steps,
            "guidance_scale": request.guidance_scale,
            "guidance_rescale": request.guidance_rescale,
            "generator": seeded_generators(seeds),
            "output_type": "latent",
        }
        if size_conditioning is not None:
            arguments.update(original_size=size_conditioning, target_size=size_conditioning)
        if control is not None and not refine:
            control.check_arguments(pipe, arguments)
            arguments.update(control.call_kwargs(image[0].size, img2img=True))
        encodes = not isinstance(image, torch.Tensor)
        width, height = image[0].size if encodes else (0, 0)  # latents need no encode: nothing to tile
        with _unet_context(control), vae_tiling(pipe.vae, width, height, self.settings.vae_tile_pixels) as tiled:
            latents = pipe(
                **arguments,
                **stage_callbacks(
                    embeds,
                    step_callback(progress, 0, max(1, int(steps * strength)), calls_per_step(request.sampling.sampler)),
                    stage,
                ),
            ).images
        return latents, tiled if encodes else None

    def inpaint(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        plan: InpaintPlan,
        progress: ProgressCallback | None,
    ) -> tuple[torch.Tensor, dict[str, Any], list[Stage]]:
        """Masked img2img on the base's own modules (a 9-channel inpainting UNet reads the mask and the masked image
        too); the latents of ``plan``'s generation size, before :meth:`InpaintPlan.composite` pastes them back."""
        pipe = self.placement.use(self.inpaint_pipe)
        steps = request.num_inference_steps
        schedule = self.schedules.base(request, steps, seeds[0])  # fresh, from the model's own config
        pipe.scheduler = schedule.scheduler
        # Counted as A1111's img2img: the schedule spans the requested steps, from the first call that runs.
        stage = Stage("base", steps, request.sampling.sampler, SAME_STEPS, schedule.spacing)
        generators = seeded_generators(seeds)
        width, height = plan.size
        with vae_tiling(pipe.vae, width, height, self.settings.vae_tile_pixels) as tiled:  # the encodes, large
            start = latent_start(pipe, plan, request.inpainting_fill, seeds, generators)
            latents = pipe(
                **embeds.at(0),
                **schedule.call_kwargs(),
                **start,
                mask_image=plan.mask,
                height=height,
                width=width,
                strength=request.strength,
                num_inference_steps=steps,
                guidance_scale=request.guidance_scale,
                guidance_rescale=request.guidance_rescale,
                generator=generators,
                output_type="latent",
                **stage_callbacks(
                    embeds,
                    step_callback(
                        progress, 0, max(1, int(steps * request.strength)), calls_per_step(request.sampling.sampler)
                    ),
                    stage,
                ),
            ).images
        info = {
            "mode": "outpaint" if request.outpaint is not None else "inpaint",
            "inpainting": {
                **plan.info,
                "strength": request.strength,
                "num_inference_steps": steps,
                "steps": stage.steps_run,
            },
            "vae_tiling": {"encode": tiled},
        }
        return latents, info, [stage]
