"""The generation engine shared by the RunPod handler and the batch runner.

request (validated) -> prompt embeddings -> latents (base, optionally refined) -> decoded images,
with per-image seeds and typed metadata. Pipelines are loaded once, from converted Diffusers folders
only (``from_pretrained``; never a single file, never the Hub), after each folder has been checked
against its manifest. An optional refiner folder runs the official worker's ensemble of experts; img2img
runs on the base model's own components (no second copy in memory) unless a request asks for the refiner.

Nothing one job does can change the next: every job gets a fresh scheduler built from the
model's scheduler config, its own generators, and exactly the LoRAs it asks for.
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
from model_build.layout import BASE_FAMILY, INPAINT_FAMILY
from model_build.manifest import manifest_hash, verify
from worker.adapters.controlnet.manager import ControlNetManager, controlnet_reserve
from worker.adapters.lora.manager import AppliedLora
from worker.generation.acceleration import accelerate
from worker.generation.conditioning import Embeddings, Stage
from worker.generation.decode import decode_latents
from worker.generation.grouping import group_key
from worker.generation.hires import HiresPass, HiresRun, hires_view, offset_progress
from worker.generation.inpainting import check_inpainting, check_inpainting_model, plan_inpainting, warm_up_fields
from worker.generation.metadata import (
    ServingFacts,
    describe_schedule_calls,
    job_metadata,
    refiner_metadata,
    sampling_metadata,
)
from worker.generation.seeds import image_seeds, resolve_seed
from worker.generation.stages import ProgressCallback, StageRunner
from worker.model.loading import PhaseClock, load_refiner, require_family
from worker.model.placement import Placement
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.encoding import PromptEncoder
from worker.prompting.stepping import SAME_STEPS
from worker.request.samplers import schedule_steps
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
        import diffusers
        import transformers
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

        # Loading bars would interleave with the worker's and the batch runner's own output.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        clock.lap("import_pipelines_s")
        self.settings = settings if settings is not None else Settings()  # defaults: commands read the environment
        self.model_dir = Path(model_dir)
        self.manifest = verify(self.model_dir)  # raises ModelFolderError with the command to run
        # An SDXL inpainting folder (9-channel UNet) serves masked jobs only (worker.generation.inpainting).
        family = require_family(self.manifest, self.model_dir, (BASE_FAMILY, INPAINT_FAMILY), "MODEL_DIR")
        self.is_inpainting_model = family == INPAINT_FAMILY
        check_inpainting_model(self.is_inpainting_model, self.settings)
        self.model_name = self.model_dir.name
        self.model_hash = manifest_hash(self.model_dir)
        self.is_dev_model = self.manifest.dev_model
        clock.lap("verify_s")
        cuda = torch.cuda.is_available()
        self.dtype = torch.float16 if cuda else torch.float32
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            self.model_dir, dtype=self.dtype, local_files_only=True, use_safetensors=True
        )
        self.pipe.set_progress_bar_config(disable=True)
        clock.lap("load_s")
        self.refiner, self.refiner_info = None, None
        if refiner_dir is not None:
            self.refiner, self.refiner_info = load_refiner(
                Path(refiner_dir), self.pipe, self.manifest, self.dtype, StableDiffusionXLImg2ImgPipeline
            )
            clock.lap("load_refiner_s")
        reserved = controlnet_reserve(self.settings, self.dtype)  # room for the ControlNets jobs will load
        self.placement = Placement(self.pipe, self.refiner, offload or self.settings.offload, cuda, reserved)
        self.plan = self.placement.plan
        clock.lap("to_device_s")
        self.accelerator = accelerate(self.pipe, self.settings)  # COMPILE etc.: compiles now, never in a job
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
        # img2img on the base model: the same modules under the img2img pipeline's loop. Not from_pipe(): without a
        # dtype it casts every shared module to float32 (an fp32 UNet on the GPU ran 3.5x slower, H200 2026-11-30).
        self.img2img = StableDiffusionXLImg2ImgPipeline(**self.pipe.components)
        self.img2img.set_progress_bar_config(disable=True)
        self.inpaint = StableDiffusionXLInpaintPipeline(**self.pipe.components)  # likewise: masked jobs
        self.inpaint.set_progress_bar_config(disable=True)
        self.stages = StageRunner(self.pipe, self.img2img, self.inpaint, self.refiner, self.placement, self.settings)
        self.scheduler_config = self.stages.scheduler_config
        self.prompt_encoder = self._prompt_encoder(self.pipe)
        self.refiner_prompt_encoder = self._refiner_prompt_encoder(StableDiffusionXLPipeline)
        self.loras = self._lora_manager()
        self.hires = HiresPass(self.stages, self.encode, self.decode, self._clock)
        self.controlnets = ControlNetManager(self.pipe.unet.config, self.dtype, self.settings, self.placement.adopt)
        clock.lap("prompt_encoders_s")
        if cuda and self.settings.warmup and self.plan.offload in ("none", "model"):  # sequential: minutes
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
        """Run one short job of the first warm-up size through the whole path, and forget it; returns seconds.

        A first job pays for CUDA kernels loading, cuBLAS/cuDNN handles and heuristics, the allocator's first
        blocks and the text encoders' CUDA-graph capture (1-2 s on an H200 with full-size SDXL). The worker pays
        that here, at start-up (WARMUP=1, GPU only), so no paid job does. The job's prompts leave the prompt
        cache, and nothing else it touches holds state: the next job gives the same bytes as without it.
        """
        from worker.request.schema import parse_request

        started = time.perf_counter()
        width, height = size or (self.settings.warmup_sizes[0] if self.settings.warmup_sizes else (1024, 1024))
        fields = {"prompt": "warm-up", "negative_prompt": "warm-up", "width": width, "height": height}
        # 4 refiner steps: at the default strength 0.3 that is one step (2 would be none, an error).
        if self.is_inpainting_model:  # it serves masked jobs only
            fields.update(warm_up_fields(width, height))
        request = parse_request({**fields, "num_inference_steps": steps, "refiner_inference_steps": 4, "seed": 0})
        try:
            self.generate(request)
        finally:
            self.prompt_encoder.clear_cache()
            if self.refiner_prompt_encoder is not None:
                self.refiner_prompt_encoder.clear_cache()
        return time.perf_counter() - started

    def _refiner_prompt_encoder(self, pipeline_class: Any) -> PromptEncoder | None:
        """An encoder for a refiner whose bigG text encoder differs from the base's (None when they are shared).

        It runs the same chunking and weighting over the base's CLIP-L and the refiner's bigG, so its bigG part is
        the refiner's own conditioning for long and weighted prompts.
        """
        if self.refiner is None or self.refiner.text_encoder_2 is self.pipe.text_encoder_2:
            return None
        components = {**self.pipe.components, "text_encoder_2": self.refiner.text_encoder_2}
        if getattr(self.refiner, "tokenizer_2", None) is not None:
            components["tokenizer_2"] = self.refiner.tokenizer_2
        return self._prompt_encoder(pipeline_class(**components))

    def _prompt_encoder(self, pipe: Any) -> PromptEncoder:
        return PromptEncoder(
            pipe,
            cuda_graphs=self.settings.prompt_encoder_cuda_graphs,
            cache_bytes=int(self.settings.prompt_cache_mb * 1024 * 1024),
            weighting=self.settings.prompt_weighting,
        )

    def _lora_manager(self) -> Any:
        from worker.adapters.lora.manager import LoraManager
        from worker.adapters.lora.sources import LoraSettings

        return LoraManager(
            self.pipe,
            on_text_encoder_change=self.prompt_encoder.clear_cache,
            settings=LoraSettings.from_settings(self.settings),
        )

    @property
    def execution_device(self) -> torch.device:
        return self.pipe._execution_device

    # -- jobs ------------------------------------------------------------------------------------

    def uses_refiner(self, request: GenerationRequest) -> bool:
        """Whether this request runs the refiner: the official worker refines every text-to-image job."""
        if request.refiner and self.refiner is None:
            raise InvalidRequest(
                "refiner: true, but this worker has no refiner loaded; set REFINER_DIR (or REFINER_NAME) to a "
                "converted SDXL refiner, or leave refiner out"
            )
        if request.is_img2img:
            return bool(request.refiner)  # img2img runs on the base unless the request asks for the refiner
        return self.refiner is not None if request.refiner is None else request.refiner

    def check_request(self, request: GenerationRequest) -> None:
        """Model-dependent limits the schema cannot know."""
        self.prompt_encoder.check_clip_skip(request.clip_skip)  # before any LoRA or GPU work
        self.controlnets.check(request.controlnets)  # names and fit: JSON only, before anything loads
        check_inpainting(request, self.model_name, self.is_inpainting_model)
        refine = self.uses_refiner(request)
        self.stages.check_sampling(request, refine)
        frac = None if request.enable_hr else request.high_noise_frac  # after a hires pass the refiner refines
        if request.enable_hr:
            self.hires.check(request)
        if request.is_img2img or (refine and frac is None):
            field = "refiner_inference_steps" if refine else "num_inference_steps"
            steps = request.refiner_inference_steps if refine else request.num_inference_steps
            if int(steps * request.strength) < 1:
                raise InvalidRequest(
                    f"strength: {request.strength:g} x {field} {steps} leaves no denoising step "
                    f"(img2img runs int(steps x strength) steps); raise strength or {field}"
                )
        elif refine and frac is not None:
            self.stages.check_ensemble_split(request)

    def activate_loras(self, request: GenerationRequest) -> list[AppliedLora]:
        return self.loras.activate(request.loras)

    def encode(self, request: GenerationRequest, encoder: PromptEncoder | None = None) -> EncodedPrompts:
        return (encoder or self.prompt_encoder).encode(
            request.prompt,
            prompt_2=request.prompt_2,
            negative_prompt=request.negative_prompt,
            negative_prompt_2=request.negative_prompt_2,
            clip_skip=request.clip_skip,
            do_classifier_free_guidance=request.guidance_scale > 1.0,
            steps=self.prompt_schedule_steps(request),  # A1111 prompt editing ([a:b:when], [a|b]) counts these
        )

    def group_key(self, request: GenerationRequest, encoded: EncodedPrompts | None = None) -> tuple:
        """:func:`.grouping.group_key`, with the hires pass's prompt shape when the request has one."""
        hires = self.encode(hires_view(request)) if request.enable_hr else None
        return group_key(request, encoded if encoded is not None else self.encode(request), hires)

    def prompt_schedule_steps(self, request: GenerationRequest) -> int:
        """The steps A1111 1.10 computes the prompt-editing schedule over: those of the model that runs first (the
        refiner's for img2img through it, as A1111's img2img schedules over the requested steps), times 2 for the
        schedulers that make two model calls per step (:func:`worker.request.samplers.schedule_steps`)."""
        refiner_first = request.is_img2img and self.uses_refiner(request)
        steps = request.refiner_inference_steps if refiner_first else request.num_inference_steps
        return schedule_steps(request.sampling.sampler, steps)

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
        embeds = Embeddings(encoded, requests, cfg=first.guidance_scale > 1.0)

        hires: HiresRun | None = None
        plan = None
        if first.is_inpainting:
            started = self._clock()
            most_images = max(request.num_images for request in requests)
            plan = plan_inpainting(first, self.settings, most_images, self.is_inpainting_model)
            latents, mode_info, stages = self.stages.inpaint(first, embeds, all_seeds, plan, progress)
            size = plan.output_size
            times["denoising_s"] = self._clock() - started
        elif first.is_img2img:
            started = self._clock()
            own = self._refiner_embeddings(embeds) if refine else embeds  # the whole call's requests
            latents, size, mode_info, stages = self.stages.img2img(first, own, all_seeds, refine, progress, control)
            times["denoising_s"] = self._clock() - started
        else:
            latents, stages, hires = self._text_to_image(embeds, all_seeds, refine, progress, times, loras, control)
            size, mode_info = hires.size if hires else (first.width, first.height), {"mode": "txt2img"}

        if control is not None and not control.used:  # never drop a job's ControlNets without a word
            raise InvalidRequest("controlnets: this job's mode does not take ControlNets; send it without them")
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
            "vae_tiling": {**mode_info.get("vae_tiling", {}), "decode": decode_tiled},
        }
        volatile = {"controlnets": control.volatile()} if control is not None else {}
        results, offset = [], 0
        for index, (request, enc, seeds) in enumerate(zip(requests, encoded, seeds_per_request, strict=True)):
            own_images = images[offset : offset + len(seeds)]
            offset += len(seeds)
            describe_schedule_calls(enc, stages if hires is None else stages[:1])
            info = run_info if hires is None else {**run_info, "hires": hires.describe(index, stages[2:])}
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
            schedule = self.prompt_schedule_steps(later)
            refiner_embeds = self._refiner_embeddings(later_embeds)
            latents, refined = self.stages.refine(later, refiner_embeds, latents, seeds, progress, schedule)
            stages.append(refined)
            times["refiner_s"] = self._clock() - started
        return latents, stages, hires

    def _refiner_embeddings(self, embeds: Embeddings) -> Embeddings:
        """The refiner's conditioning for the requests of ``embeds`` (the whole call), with their full schedules."""
        if self.refiner_prompt_encoder is None:
            encoded = embeds.encoded  # the refiner shares the base's bigG encoder: its part of the same embeddings
        else:
            encoded = [self.encode(request, self.refiner_prompt_encoder) for request in embeds.requests]
        return Embeddings(encoded, embeds.requests, embeds.cfg, self.pipe.text_encoder.config.hidden_size)

    def decode(self, latents: torch.Tensor, loras: Sequence[AppliedLora] = ()) -> tuple[list[Image.Image], bool]:
        """Latents -> (PIL images, whether the VAE tiled), refusing NaN and all-black results."""
        device = self.execution_device if self.plan.offload == "none" else None
        return decode_latents(self.pipe, latents, device, loras, self.settings.vae_tile_pixels)

    def _clock(self) -> float:
        if self.plan.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
