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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from core.errors import InternalError, InvalidRequest
from core.results import GenerationMetadata, Timings
from core.settings import Settings
from model_build.dev_model import DEV_MODEL_NOTICE
from model_build.layout import BASE_FAMILY
from model_build.manifest import manifest_hash, verify
from worker.acceleration import accelerate
from worker.adapters.lora.manager import AppliedLora
from worker.generation.conditioning import Embeddings, Stage
from worker.generation.decode import decode_latents
from worker.generation.grouping import group_key
from worker.generation.metadata import ServingFacts, describe_schedule_calls, job_metadata, refiner_metadata
from worker.generation.seeds import image_seeds, refiner_seed, resolve_seed
from worker.input_images import load_input_image
from worker.model.loading import PhaseClock, load_refiner, require_family
from worker.model.placement import Placement
from worker.prompting.encoding import EncodedPrompts, PromptEncoder
from worker.prompting.stepping import SAME_STEPS, CallCounter, StageSteps, pipeline_callback_kwargs
from worker.schedulers import build_scheduler, calls_per_step, schedule_steps
from worker.schema import MIN_SIDE, SIDE_MULTIPLE, GenerationRequest

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


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
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        # Loading bars would interleave with the worker's and the batch runner's own output.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        clock.lap("import_pipelines_s")
        self.settings = settings if settings is not None else Settings()  # defaults: commands read the environment
        self.model_dir = Path(model_dir)
        self.manifest = verify(self.model_dir)  # raises ModelFolderError with the command to run
        require_family(self.manifest, self.model_dir, BASE_FAMILY, "MODEL_DIR")
        self.model_name = self.model_dir.name
        self.model_hash = manifest_hash(self.model_dir)
        self.is_dev_model = bool(self.manifest.get("dev_model"))
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
        self.placement = Placement(self.pipe, self.refiner, offload or self.settings.offload, cuda)
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
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.prompt_encoder = self._prompt_encoder(self.pipe)
        self.refiner_prompt_encoder = self._refiner_prompt_encoder(StableDiffusionXLPipeline)
        self.loras = self._lora_manager()
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
        from worker.schema import parse_request

        started = time.perf_counter()
        width, height = size or (self.settings.warmup_sizes[0] if self.settings.warmup_sizes else (1024, 1024))
        fields = {"prompt": "warm-up", "negative_prompt": "warm-up", "width": width, "height": height}
        # 4 refiner steps: at the default strength 0.3 that is one step (2 would be none, an error).
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
        refine = self.uses_refiner(request)
        if request.is_img2img or (refine and request.high_noise_frac is None):
            field = "refiner_inference_steps" if refine else "num_inference_steps"
            steps = request.refiner_inference_steps if refine else request.num_inference_steps
            if int(steps * request.strength) < 1:
                raise InvalidRequest(
                    f"strength: {request.strength:g} x {field} {steps} leaves no denoising step "
                    f"(img2img runs int(steps x strength) steps); raise strength or {field}"
                )
        elif refine and request.high_noise_frac is not None:
            self._check_ensemble_split(request)

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

    def prompt_schedule_steps(self, request: GenerationRequest) -> int:
        """The steps A1111 1.10 computes the prompt-editing schedule over: those of the model that runs first (the
        refiner's for img2img through it, as A1111's img2img schedules over the requested steps), times 2 for the
        schedulers that make two model calls per step (:func:`worker.schedulers.schedule_steps`)."""
        refiner_first = request.is_img2img and self.uses_refiner(request)
        steps = request.refiner_inference_steps if refiner_first else request.num_inference_steps
        return schedule_steps(request.scheduler, steps)

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
        loras = self.activate_loras(first)
        times["lora_s"] = self._clock() - started

        started = self._clock()
        encoded = [self.encode(request) for request in requests]
        times["text_encoding_s"] = self._clock() - started
        keys = {group_key(request, enc) for request, enc in zip(requests, encoded, strict=True)}
        if len(keys) != 1:
            raise InternalError("requests of different shapes cannot share one pipeline call")

        seeds_per_request = [image_seeds(resolve_seed(r), r.num_images) for r in requests]
        all_seeds = [seed for seeds in seeds_per_request for seed in seeds]
        refine = self.uses_refiner(first)
        embeds = Embeddings(encoded, requests, cfg=first.guidance_scale > 1.0)

        started = self._clock()
        if first.is_img2img:
            latents, size, mode_info, stages = self._img2img(first, embeds, all_seeds, refine, progress)
            times["denoising_s"] = self._clock() - started
        else:
            stages = [Stage("base", first.num_inference_steps, first.scheduler, SAME_STEPS)]
            latents = self._text_to_latents(first, embeds, all_seeds, refine, progress, stages[0])
            size, mode_info = (first.width, first.height), {"mode": "txt2img"}
            times["denoising_s"] = self._clock() - started
            if refine:
                started = self._clock()
                latents, refined = self._refine(first, self._refiner_embeddings(embeds), latents, all_seeds, progress)
                stages.append(refined)
                times["refiner_s"] = self._clock() - started

        started = self._clock()
        images = self.decode(latents, loras)
        times["vae_decode_s"] = self._clock() - started

        timings = Timings(**{key: value for key, value in times.items()})
        run_info = {
            **mode_info,
            **refiner_metadata(first, refine, stages, self.facts),
            "stages": [s.describe() for s in stages],
        }
        results, offset = [], 0
        for request, enc, seeds in zip(requests, encoded, seeds_per_request, strict=True):
            own_images = images[offset : offset + len(seeds)]
            offset += len(seeds)
            describe_schedule_calls(enc, stages)
            metadata = job_metadata(request, enc, seeds, loras, timings, size, run_info, self.facts)
            results.append(GenerationResult(request, own_images, seeds, metadata))
        return results

    # -- the pipeline calls ----------------------------------------------------------------------

    @staticmethod
    def _callbacks(embeds: Embeddings, progress_callback: Any, stage: Stage) -> dict[str, Any]:
        """A pipeline call's step callback: it counts the stage's model calls, reports progress and switches edited
        prompts' conditioning at the schedule steps the stage's calls map to."""
        images = [request.num_images for request in embeds.requests]
        stage.counter = CallCounter(progress_callback)
        return pipeline_callback_kwargs(
            embeds.encoded, images, embeds.cfg, stage.counter, stage.steps, embeds.first_feature
        )

    def _refiner_embeddings(self, embeds: Embeddings) -> Embeddings:
        """The refiner's conditioning for the requests of ``embeds`` (the whole call), with their full schedules."""
        if self.refiner_prompt_encoder is None:
            encoded = embeds.encoded  # the refiner shares the base's bigG encoder: its part of the same embeddings
        else:
            encoded = [self.encode(request, self.refiner_prompt_encoder) for request in embeds.requests]
        return Embeddings(encoded, embeds.requests, embeds.cfg, self.pipe.text_encoder.config.hidden_size)

    def _refiner_scheduler(self, request: GenerationRequest, seed: int) -> Any:
        """A fresh refiner scheduler from the refiner's own config as loaded (each job replaces the pipeline's, so
        reading it back from the pipeline would carry one job's overrides, such as Karras sigmas, into the next)."""
        if not hasattr(self, "_refiner_scheduler_config"):
            self._refiner_scheduler_config = dict(self.refiner.scheduler.config)
        return build_scheduler(request.scheduler, self._refiner_scheduler_config, noise_seed=seed)

    @staticmethod
    def _img2img_calls(
        pipeline_class: Any, scheduler: Any, steps: int, strength: float, denoising_start: float | None
    ) -> tuple[int, int]:
        """(model calls of the full ``steps``-step schedule, calls an img2img-pipeline call leaves out before its
        first one for ``strength`` or ``denoising_start``), by diffusers' own ``get_timesteps`` on a copy of
        ``scheduler``: known before the call, so the refiner's first call gets its conditioning as an argument."""
        probe = type(scheduler).from_config(scheduler.config)
        probe.set_timesteps(steps, device="cpu")
        holder = SimpleNamespace(scheduler=probe)
        timesteps, _ = pipeline_class.get_timesteps(holder, steps, strength, "cpu", denoising_start=denoising_start)
        return len(probe.timesteps), len(probe.timesteps) - len(timesteps)

    def _check_ensemble_split(self, request: GenerationRequest) -> None:
        """Refuse a ``high_noise_frac`` that leaves the base or the refiner no model call (issue 24: 0.999999 ran no
        refiner step and reported it used)."""
        frac = request.high_noise_frac
        base = build_scheduler(request.scheduler, self.scheduler_config)
        base.set_timesteps(request.num_inference_steps, device="cpu")
        # diffusers' StableDiffusionXLPipeline (8.1, denoising_end): the base runs the timesteps at or above this.
        train = base.config.num_train_timesteps
        base_calls = int((base.timesteps >= round(train - frac * train)).sum())
        steps = request.refiner_inference_steps
        scheduler = self._refiner_scheduler(request, 0)
        total, skipped = self._img2img_calls(type(self.refiner), scheduler, steps, request.strength, frac)
        refiner_calls = total - skipped
        if base_calls < 1:
            raise InvalidRequest(
                f"high_noise_frac: {frac:g} with num_inference_steps {request.num_inference_steps} leaves the base "
                "model no denoising step (it would hand pure noise to the refiner); raise high_noise_frac or "
                "num_inference_steps"
            )
        if refiner_calls < 1:
            raise InvalidRequest(
                f"high_noise_frac: {frac:g} with refiner_inference_steps {steps} leaves the refiner no denoising "
                "step; lower high_noise_frac, raise refiner_inference_steps, or leave high_noise_frac out to "
                "refine the finished image at strength"
            )

    def _scheduler(self, request: GenerationRequest, seeds: list[int]) -> Any:
        return build_scheduler(request.scheduler, self.scheduler_config, noise_seed=seeds[0])

    @staticmethod
    def _generators(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    @staticmethod
    def _step_callback(progress: ProgressCallback | None, done_before: int, total: int, per_step: int = 1) -> Any:
        """Reports steps, not model calls: diffusers calls back after every model call, and the second-order
        schedulers make two per step (Heun's 4 steps are 7 calls)."""
        if progress is None:
            return None

        def callback(pipe: Any, call: int, timestep: Any, tensors: dict) -> dict:
            progress(min(total, done_before + call // per_step + 1), total)
            return tensors

        return callback

    def _total_steps(self, request: GenerationRequest, refine: bool) -> int:
        base = request.num_inference_steps
        if not refine or request.is_img2img:
            return base
        return base + request.refiner_inference_steps

    def _text_to_latents(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        refine: bool,
        progress: ProgressCallback | None,
        stage: Stage,
    ) -> torch.Tensor:
        pipe = self.placement.use(self.pipe)
        pipe.scheduler = self._scheduler(request, seeds)
        return pipe(
            **embeds.base(),
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            denoising_end=request.high_noise_frac if refine else None,
            guidance_scale=request.guidance_scale,
            generator=self._generators(seeds),
            output_type="latent",
            **self._callbacks(
                embeds,
                self._step_callback(progress, 0, self._total_steps(request, refine), calls_per_step(request.scheduler)),
                stage,
            ),
        ).images

    def _refine(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        latents: torch.Tensor,
        seeds: list[int],
        progress: ProgressCallback | None,
    ) -> tuple[torch.Tensor, Stage]:
        """The official worker's second stage: the refiner continues from the base's latents.

        With ``high_noise_frac`` the two models split one noise schedule (ensemble of experts: the base stops
        at that fraction, the refiner starts there); without it the refiner runs img2img at ``strength`` over
        the finished base latents, exactly as the official worker does. Either way the refiner's calls continue
        the prompt-editing schedule where its own schedule stands (:mod:`worker.prompting.stepping`).
        """
        refiner = self.placement.use(self.refiner)
        refiner.scheduler = self._refiner_scheduler(request, seeds[0])
        steps = request.refiner_inference_steps
        _, skipped = self._img2img_calls(
            type(refiner), refiner.scheduler, steps, request.strength, request.high_noise_frac
        )
        mapping = StageSteps(skipped, self.prompt_schedule_steps(request), schedule_steps(request.scheduler, steps))
        stage = Stage("refiner", steps, request.scheduler, mapping)
        latents = refiner(
            **embeds.at(mapping.schedule_step(0)),
            image=latents,
            num_inference_steps=steps,
            denoising_start=request.high_noise_frac,
            strength=request.strength,
            guidance_scale=request.guidance_scale,
            generator=self._generators([refiner_seed(seed) for seed in seeds]),
            output_type="latent",
            **self._callbacks(
                embeds,
                self._step_callback(
                    progress,
                    request.num_inference_steps,
                    self._total_steps(request, True),
                    calls_per_step(request.scheduler),
                ),
                stage,
            ),
        ).images
        return latents, stage

    def _img2img(
        self,
        request: GenerationRequest,
        embeds: Embeddings,
        seeds: list[int],
        refine: bool,
        progress: ProgressCallback | None,
    ) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any], list[Stage]]:
        source = load_input_image(request.image_url or "", self.settings)
        size = self._img2img_size(request, source.size)
        image = source if source.size == size else source.resize(size, Image.Resampling.LANCZOS)
        if refine:
            embeds = self._refiner_embeddings(embeds)  # the whole call's requests, as the base's embeddings hold
        pipe = self.placement.use(self.refiner if refine else self.img2img)
        # A fresh scheduler from the model's own config (the pipeline's current one is the previous job's).
        pipe.scheduler = self._refiner_scheduler(request, seeds[0]) if refine else self._scheduler(request, seeds)
        steps = request.refiner_inference_steps if refine else request.num_inference_steps
        # A1111's img2img: the schedule spans the requested steps and its counter starts at the first call that runs.
        stage = Stage("refiner" if refine else "base", steps, request.scheduler, SAME_STEPS)
        latents = pipe(
            **embeds.at(0),
            image=[image] * len(seeds),
            strength=request.strength,
            num_inference_steps=steps,
            guidance_scale=request.guidance_scale,
            generator=self._generators(seeds),
            output_type="latent",
            **self._callbacks(
                embeds,
                self._step_callback(
                    progress, 0, max(1, int(steps * request.strength)), calls_per_step(request.scheduler)
                ),
                stage,
            ),
        ).images
        info = {
            "mode": "img2img",
            "img2img": {
                "strength": request.strength,
                "input_size": list(source.size),
                "model": stage.model,
                "num_inference_steps": steps,  # the schedule strength cuts: int(steps x strength) of it ran
                "steps": stage.steps_run,
            },
        }
        return latents, size, info, [stage]

    @staticmethod
    def _img2img_size(request: GenerationRequest, source_size: tuple[int, int]) -> tuple[int, int]:
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

    def decode(self, latents: torch.Tensor, loras: Sequence[AppliedLora] = ()) -> list[Image.Image]:
        """Latents -> PIL images through the VAE, refusing NaN and all-black results."""
        device = self.execution_device if self.plan.offload == "none" else None
        return decode_latents(self.pipe, latents, device, loras)

    def _clock(self) -> float:
        if self.plan.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
