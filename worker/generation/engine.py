"""The generation engine shared by the RunPod handler and the batch runner: it checks requests, groups them and
orchestrates their stages.

request (validated) -> prompt embeddings -> latents (base, hires, refiner; or img2img, inpainting) -> decoded
images, with per-image seeds and typed metadata. The model is loaded once (:mod:`worker.model.pipelines`); nothing
one job does can change the next: every job gets fresh schedulers from the model's configs, its own generators, and
exactly the LoRAs and ControlNets it asks for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.errors import InternalError, InvalidRequest
from core.results import GenerationMetadata, Timings
from core.settings import Settings
from model_build.dev_model import DEV_MODEL_NOTICE
from worker.adapters.controlnet.manager import ControlNetManager
from worker.adapters.ip_adapter.manager import IpAdapterManager
from worker.adapters.lora.manager import AppliedLora
from worker.generation.acceleration import accelerate, accelerate_refiner
from worker.generation.conditioning import Embeddings, Stage
from worker.generation.decode import decode_latents
from worker.generation.grouping import group_key
from worker.generation.hires import HiresPass, HiresRun, hires_view, offset_progress
from worker.generation.inpainting import check_inpainting_model, plan_inpainting
from worker.generation.metadata import (
    ServingFacts,
    describe_schedule_calls,
    job_metadata,
    refiner_metadata,
    sampling_metadata,
)
from worker.generation.prompt_encoders import build_prompt_encoders
from worker.generation.request_checks import RequestChecks
from worker.generation.routing import prompt_schedule_steps, uses_refiner
from worker.generation.seeds import image_seeds, resolve_seed
from worker.generation.stages import ProgressCallback, StageRunner
from worker.generation.warm_up import run_warm_up, warm_up_request
from worker.model.loading import PhaseClock
from worker.model.pipelines import load_model
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.stepping import SAME_STEPS
from worker.request.schema import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    metadata: GenerationMetadata


class Engine:
    """Loaded SDXL pipelines (base, optional refiner) and everything needed to turn requests into images."""

    def __init__(
        self,
        model_dir: Path | str,
        offload: str | None = None,
        *,
        settings: Settings | None = None,
        refiner_dir: Path | str | None = None,
    ) -> None:
        # Where start-up time goes (seconds per phase), for the log and `nox -s bench`'s cold-start figures.
        self.startup_phases: dict[str, float] = {}
        clock = PhaseClock(self.startup_phases)
        self.settings = settings if settings is not None else Settings()  # defaults: commands read the environment
        model = load_model(
            Path(model_dir),
            Path(refiner_dir) if refiner_dir is not None else None,
            self.settings,
            offload or self.settings.offload,
            clock,
        )
        self.model_dir, self.manifest, self.model_name, self.model_hash = model.dir_facts()
        self.is_dev_model, self.is_inpainting_model = model.manifest.dev_model, model.is_inpainting_model
        check_inpainting_model(self.is_inpainting_model, self.settings)
        self.dtype, self.pipe, self.refiner, self.refiner_info = model.dtype, model.pipe, model.refiner, model.info
        self.img2img, self.inpaint = model.img2img, model.inpaint  # the base's modules under the other loops
        self.placement, self.plan = model.placement, model.placement.plan
        self.accelerator = accelerate(self.pipe, self.settings)  # COMPILE etc.: compiles now, never in a job
        # The refiner's UNet too, where the whole refiner stays on the device (offloaded models compile nothing).
        self.refiner_accelerator = (
            accelerate_refiner(self.refiner, self.settings, self.accelerator)
            if self.refiner is not None and self.plan.offload == "none"
            else None
        )
        clock.lap("compile_s")
        self.facts = ServingFacts(
            self.model_name,
            self.model_hash,
            self.is_dev_model,
            self.plan.device,
            self.plan.offload,
            str(self.dtype),
            self.accelerator.describe(),
            self.refiner_info,
            self.refiner is not None,
        )
        self.stages = StageRunner(self.pipe, self.img2img, self.inpaint, self.refiner, self.placement, self.settings)
        self.scheduler_config = self.stages.scheduler_config
        self.encoders = build_prompt_encoders(self.pipe, self.refiner, self.settings)
        self.prompt_encoder, self.refiner_prompt_encoder = self.encoders.base, self.encoders.refiner
        self.loras = self._lora_manager()
        self.hires = HiresPass(self.stages, self.encode, self.decode, self._clock)
        self.controlnets = ControlNetManager(self.pipe.unet.config, self.dtype, self.settings, self.placement.adopt)
        self.ip_adapters = IpAdapterManager(self.pipe.unet, self.dtype, self.settings, self.placement)
        self.checks = RequestChecks(
            self.prompt_encoder,
            self.controlnets,
            self.ip_adapters,
            self.hires,
            self.stages.schedules,
            self.model_name,
            self.is_inpainting_model,
            self.refiner is not None,
        )
        clock.lap("prompt_encoders_s")
        sequential = self.plan.offload == "sequential"  # a warm-up would take minutes
        if self.plan.device == "cuda" and self.settings.warmup and not sequential:
            try:
                self.warm_up()
            except Exception as error:  # only a speed-up: a worker that cannot warm up still serves
                log.warning("start-up warm-up failed, the first job will be slower (WARMUP=0 skips it): %s", error)
                torch.cuda.empty_cache()
            clock.lap("warm_up_s")
        log.info(
            "loaded %s (%s, manifest %s)%s in %.1f s; %s; start-up phases %s",
            self.model_dir,
            self.dtype,
            self.model_hash,
            f" with refiner {self.refiner_info['name']}" if self.refiner_info else "",
            sum(self.startup_phases.values()),
            self.plan.reason,
            json.dumps(self.startup_phases),
        )
        if self.is_dev_model:
            log.warning(DEV_MODEL_NOTICE)

    # -- set-up ------------------------------------------------------------------------------

    def warm_up(self, steps: int = 2, size: tuple[int, int] | None = None) -> float:
        """Run one short job of the first warm-up size through the whole path, and forget it; returns seconds."""
        request = warm_up_request(self.settings, self.is_inpainting_model, steps, size)
        return run_warm_up(self.generate, request, self.encoders.clear_caches)

    def _lora_manager(self) -> Any:
        from worker.adapters.lora.manager import LoraManager
        from worker.adapters.lora.sources import LoraSettings

        # The refiner's encoder runs the base's CLIP-L too: a LoRA that changes it changes both encoders' results.
        on_change = self.encoders.clear_caches
        return LoraManager(
            self.pipe, on_text_encoder_change=on_change, settings=LoraSettings.from_settings(self.settings)
        )

    @property
    def execution_device(self) -> torch.device:
        return self.pipe._execution_device

    # -- jobs ------------------------------------------------------------------------------------

    def uses_refiner(self, request: GenerationRequest) -> bool:
        return uses_refiner(request, self.refiner is not None)

    def check_request(self, request: GenerationRequest) -> None:
        """Model-dependent limits the schema cannot know (:mod:`.request_checks`)."""
        self.checks.check(request)

    def activate_loras(self, request: GenerationRequest) -> list[AppliedLora]:
        return self.loras.activate(request.loras)

    def encode(self, request: GenerationRequest) -> EncodedPrompts:
        return self.encoders.encode(request)

    def group_key(self, request: GenerationRequest, encoded: EncodedPrompts | None = None) -> tuple:
        """:func:`.grouping.group_key`, with the hires pass's prompt shape when the request has one."""
        hires = self.encode(hires_view(request)) if request.enable_hr else None
        return group_key(request, encoded if encoded is not None else self.encode(request), hires)

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        return self.generate_group([request], progress)[0]

    def generate_group(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Run requests that share a :func:`group_key` as one pipeline call (one GPU batch)."""
        if not requests:
            return []
        for request in requests:
            self.check_request(request)
        first = requests[0]
        times: dict[str, float] = {}

        started = self._clock()
        control = self.controlnets.prepare(first.controlnets)  # a shared call's requests have equal controlnets
        if control is not None:
            times["controlnet_s"] = self._clock() - started
        started = self._clock()
        image_prompt = self.ip_adapters.prepare(first.ip_adapters)  # images encoded once for the whole call
        if image_prompt is not None:
            times["ip_adapter_s"] = self._clock() - started

        started = self._clock()
        loras = self.activate_loras(first)
        times["lora_s"] = self._clock() - started

        started = self._clock()
        encoded = [self.encode(request) for request in requests]
        times["text_encoding_s"] = self._clock() - started
        keys = {self.group_key(request, enc) for request, enc in zip(requests, encoded, strict=True)}
        if len(keys) != 1:
            raise InternalError("requests of different shapes cannot share one pipeline call")

        seeds_per_request = [image_seeds(resolve_seed(r), r.num_images) for r in requests]
        all_seeds = [seed for seeds in seeds_per_request for seed in seeds]
        refine = self.uses_refiner(first)
        embeds = Embeddings(encoded, requests, cfg=first.guidance_scale > 1.0, image_prompt=image_prompt)

        hires: HiresRun | None = None
        plan, own_modes = None, None
        with self.ip_adapters.applied(image_prompt):  # the job's IP-Adapters in the UNet for its calls only
            if first.is_inpainting:
                started = self._clock()
                most_images = max(request.num_images for request in requests)
                plan = plan_inpainting(first, self.settings, most_images, self.is_inpainting_model)
                latents, mode_info, stages = self.stages.inpaint(first, embeds, all_seeds, plan, progress)
                size = plan.output_size
                times["denoising_s"] = self._clock() - started
            elif first.is_img2img:
                started = self._clock()
                own = self.encoders.refiner_embeddings(embeds) if refine else embeds  # the whole call's requests
                latents, size, own_modes, stages = self.stages.img2img(first, own, all_seeds, refine, progress, control)
                mode_info = own_modes[0]
                times["denoising_s"] = self._clock() - started
            else:
                latents, stages, hires = self._text_to_image(embeds, all_seeds, refine, progress, times, loras, control)
                size, mode_info = hires.size if hires else (first.width, first.height), {"mode": "txt2img"}

        if control is not None and not control.used:  # never drop a job's adapters without a word
            raise InvalidRequest("controlnets: this job's mode does not take ControlNets; send it without them")
        if image_prompt is not None and not image_prompt.calls:
            raise InvalidRequest("ip_adapters: this job's mode does not take IP-Adapters; send it without them")
        started = self._clock()
        images, decode_tiled = self.decode(latents, loras)
        if plan is not None:
            images = [plan.composite(image) for image in images]  # the unmasked pixels are the input's own
        times["vae_decode_s"] = self._clock() - started

        timings = Timings(**times)
        run_info = {
            **mode_info,
            **refiner_metadata(first, refine, stages, self.facts),
            "sampling": sampling_metadata(first, stages, self.scheduler_config),
            "stages": [s.describe() for s in stages],
            "controlnets": control.stable() if control is not None else [],
            "ip_adapters": image_prompt.stable() if image_prompt is not None else [],
            "vae_tiling": {**mode_info.get("vae_tiling", {}), "decode": decode_tiled},
        }
        volatile = {"controlnets": control.volatile()} if control is not None else {}
        if image_prompt is not None:
            volatile["ip_adapters"] = image_prompt.volatile()
        results, offset = [], 0
        for index, (request, enc, seeds) in enumerate(zip(requests, encoded, seeds_per_request, strict=True)):
            own_images = images[offset : offset + len(seeds)]
            offset += len(seeds)
            describe_schedule_calls(enc, stages if hires is None else stages[:1])
            info = run_info if hires is None else {**run_info, "hires": hires.describe(index, stages[2:])}
            if own_modes is not None:  # img2img: each request's own picture
                info = {**info, "img2img": own_modes[index]["img2img"]}
            metadata = job_metadata(request, enc, seeds, loras, timings, size, info, self.facts, volatile)
            results.append(GenerationResult(request, own_images, seeds, metadata))
        return results

    # -- the pipeline calls ----------------------------------------------------------------------

    def _text_to_image(
        self,
        embeds: Embeddings,
        seeds: list[int],
        refine: bool,
        progress: ProgressCallback | None,
        times: dict[str, float],
        loras: Sequence[AppliedLora],
        control: Any,
    ) -> tuple[torch.Tensor, list[Stage], HiresRun | None]:
        """The base's pass, the hires pass (``enable_hr``), then the refiner: after the base it continues the base's
        schedule (ensemble, or refining at strength); after a hires pass it refines that pass's result at strength,
        where A1111 applies a refiner by default (its "second pass")."""
        first, hires_on = embeds.requests[0], embeds.requests[0].enable_hr
        stages = [Stage("base", first.num_inference_steps, first.sampling.sampler, SAME_STEPS)]
        total = first.num_inference_steps + first.hr_steps * hires_on + first.refiner_inference_steps * refine
        started = self._clock()
        base_progress = offset_progress(progress, 0, total) if hires_on else progress
        latents = self.stages.text_to_latents(
            first, embeds, seeds, refine and not hires_on, base_progress, stages[0], control
        )
        times["denoising_s"] = self._clock() - started
        hires, later, later_embeds = None, first, embeds
        if hires_on:
            progress = offset_progress(progress, first.num_inference_steps, total)
            hires = self.hires.run(embeds, latents, seeds, progress, loras)
            latents, later, later_embeds = hires.latents, hires.views[0], hires.embeds
            stages.append(hires.stage)
            times.update(hires.times)
        if refine:
            started = self._clock()
            schedule = prompt_schedule_steps(later, True)
            refiner_embeds = self.encoders.refiner_embeddings(later_embeds)
            latents, refined = self.stages.refine(later, refiner_embeds, latents, seeds, progress, schedule)
            stages.append(refined)
            times["refiner_s"] = self._clock() - started
        return latents, stages, hires

    def decode(self, latents: torch.Tensor, loras: Sequence[AppliedLora] = ()) -> tuple[list[Image.Image], bool]:
        """Latents -> (PIL images, whether the VAE tiled), refusing NaN and all-black results."""
        device = self.execution_device if self.plan.offload == "none" else None
        return decode_latents(self.pipe, latents, device, loras, self.settings.vae_tile_pixels)

    def _clock(self) -> float:
        if self.plan.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
