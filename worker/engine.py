"""The generation engine shared by the RunPod handler and the batch runner.

request (validated) -> prompt embeddings -> latents -> decoded images, with per-image seeds and
metadata. The pipeline is loaded once, from a converted Diffusers folder only (``from_pretrained``;
never a single file, never the Hub), after the folder has been checked against its manifest.

Nothing one job does can change the next: every job gets a fresh scheduler built from the
model's scheduler config, its own generators, and exactly the LoRAs it asks for.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model_build.architectures import COMPONENTS
from model_build.dev_model import DEV_MODEL_NOTICE
from model_build.manifest import manifest_hash, verify
from worker.device_policy import DevicePlan, plan_device
from worker.prompts import EncodedPrompts, PromptEncoder
from worker.schedulers import build_scheduler
from worker.schema import MAX_SEED, GenerationRequest

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


class EngineError(Exception):
    """A job cannot run as asked (e.g. clip_skip deeper than the model); the message says what to change."""


class ImageQualityError(EngineError):
    """The VAE produced NaN or an all-black image: an error, never an image."""


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_seed(request: GenerationRequest) -> int:
    """The request's seed, or a fresh random 63-bit one."""
    return request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)


def image_seeds(first_seed: int, count: int) -> list[int]:
    """Image k uses seed + k (wrapping inside the 63-bit range), so any image can be made alone."""
    return [(first_seed + k) % (MAX_SEED + 1) for k in range(count)]


def group_key(request: GenerationRequest, encoded: EncodedPrompts) -> tuple:
    """Requests with equal keys can share one pipeline call (same latent shape, schedule and weights)."""
    return (
        request.width,
        request.height,
        request.num_inference_steps,
        request.scheduler,
        request.guidance_scale,
        tuple((lora.name, lora.scale) for lora in request.loras),
        encoded.num_chunks,
    )


class Engine:
    """A loaded SDXL pipeline and everything needed to turn requests into images."""

    def __init__(self, model_dir: Path | str, offload: str = "auto") -> None:
        import diffusers
        import transformers
        from diffusers import StableDiffusionXLPipeline

        # Loading bars would interleave with the worker's and the batch runner's own output.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.model_dir = Path(model_dir)
        self.manifest = verify(self.model_dir)  # raises ModelFolderError with the command to run
        self.model_name = self.model_dir.name
        self.model_hash = manifest_hash(self.model_dir)
        self.is_dev_model = bool(self.manifest.get("dev_model"))
        cuda = torch.cuda.is_available()
        self.dtype = torch.float16 if cuda else torch.float32
        started = time.perf_counter()
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            self.model_dir, torch_dtype=self.dtype, local_files_only=True, use_safetensors=True
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.plan = self._place(offload, cuda)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.prompt_encoder = PromptEncoder(self.pipe)
        self.loras = self._lora_manager()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s (%s, manifest %s) in %.1f s; %s",
            self.model_dir,
            self.dtype,
            self.model_hash,
            self.load_seconds,
            self.plan.reason,
        )
        if self.is_dev_model:
            log.warning(DEV_MODEL_NOTICE)

    # -- set-up ------------------------------------------------------------------------------

    def _place(self, offload: str, cuda: bool) -> DevicePlan:
        component_bytes = {
            name: sum(p.numel() * p.element_size() for p in getattr(self.pipe, name).parameters())
            for name in COMPONENTS
        }
        free = torch.cuda.mem_get_info()[0] if cuda else None
        plan = plan_device(offload, cuda, free, component_bytes)
        vae = self.pipe.vae
        if self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # The stock SDXL VAE overflows in fp16 (NaN/black images); keep it in fp32 for good
            # instead of casting back and forth on every job as the stock pipeline does.
            vae.to(torch.float32)
        if plan.offload == "none":
            self.pipe.to(plan.device)
        elif plan.offload == "model":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.enable_sequential_cpu_offload()
        return plan

    def _lora_manager(self) -> Any:
        from worker.loras import LoraManager  # imported here: worker.loras imports EngineError from this module

        return LoraManager(self.pipe, on_text_encoder_change=self.prompt_encoder.clear_cache)

    @property
    def execution_device(self) -> torch.device:
        return self.pipe._execution_device

    # -- jobs ------------------------------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> None:
        """Model-dependent limits the schema cannot know."""
        layers = min(self.pipe.text_encoder.config.num_hidden_layers, self.pipe.text_encoder_2.config.num_hidden_layers)
        if request.clip_skip is not None and request.clip_skip > layers - 2:
            raise EngineError(
                f"clip_skip: {request.clip_skip} is deeper than this model allows; use 0..{layers - 2} "
                "(0 or absent is SDXL's usual penultimate layer)"
            )

    def activate_loras(self, request: GenerationRequest) -> list[dict[str, Any]]:
        return self.loras.activate(request.loras)

    def encode(self, request: GenerationRequest) -> EncodedPrompts:
        return self.prompt_encoder.encode(
            request.prompt,
            prompt_2=request.prompt_2,
            negative_prompt=request.negative_prompt,
            negative_prompt_2=request.negative_prompt_2,
            clip_skip=request.clip_skip,
            do_classifier_free_guidance=request.guidance_scale > 1.0,
        )

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
        timings: dict[str, float] = {}

        started = self._clock()
        loras = self.activate_loras(first)
        timings["lora_s"] = self._clock() - started

        started = self._clock()
        encoded = [self.encode(request) for request in requests]
        timings["text_encoding_s"] = self._clock() - started
        keys = {group_key(request, enc) for request, enc in zip(requests, encoded, strict=True)}
        if len(keys) != 1:
            raise EngineError("internal: requests of different shapes cannot share one pipeline call")

        seeds_per_request = [image_seeds(resolve_seed(r), r.num_images) for r in requests]
        all_seeds = [seed for seeds in seeds_per_request for seed in seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in all_seeds]

        def repeat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            if tensors[0] is None:
                return None
            return torch.cat(
                [t.repeat(r.num_images, *([1] * (t.ndim - 1))) for t, r in zip(tensors, requests, strict=True)]
            )

        cfg = first.guidance_scale > 1.0
        self.pipe.scheduler = build_scheduler(first.scheduler, self.scheduler_config, noise_seed=all_seeds[0])

        callback = None
        if progress is not None:

            def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                progress(step + 1, first.num_inference_steps)
                return tensors

        started = self._clock()
        latents = self.pipe(
            prompt_embeds=repeat([e.prompt_embeds for e in encoded]),
            pooled_prompt_embeds=repeat([e.pooled_prompt_embeds for e in encoded]),
            negative_prompt_embeds=repeat([e.negative_prompt_embeds for e in encoded]) if cfg else None,
            negative_pooled_prompt_embeds=repeat([e.negative_pooled_prompt_embeds for e in encoded]) if cfg else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="latent",
            callback_on_step_end=callback,
        ).images
        timings["denoising_s"] = self._clock() - started

        started = self._clock()
        images = self.decode(latents)
        timings["vae_decode_s"] = self._clock() - started

        results, offset = [], 0
        for request, enc, seeds in zip(requests, encoded, seeds_per_request, strict=True):
            own_images = images[offset : offset + len(seeds)]
            offset += len(seeds)
            results.append(
                GenerationResult(request, own_images, seeds, self._metadata(request, enc, seeds, loras, timings))
            )
        return results

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images through the VAE, refusing NaN and all-black results."""
        vae = self.pipe.vae
        with torch.inference_mode():
            latents = latents.to(device=self.execution_device if self.plan.offload == "none" else latents.device)
            latents = latents.to(vae.dtype) / vae.config.scaling_factor
            decoded = vae.decode(latents, return_dict=False)[0]
        if torch.isnan(decoded).any():
            raise ImageQualityError(
                "the VAE produced NaN values (fp16 overflow or broken weights); no image was returned. "
                "Use a VAE that is safe in fp16 (--vae with the fp16-fix VAE) or convert with --dtype fp32"
            )
        black = [i for i in range(decoded.shape[0]) if bool((decoded[i] <= -1.0).all())]
        if black:
            raise ImageQualityError(f"image(s) {black} came out all black; no image was returned")
        return self.pipe.image_processor.postprocess(decoded.float(), output_type="pil")

    def _metadata(
        self,
        request: GenerationRequest,
        encoded: EncodedPrompts,
        seeds: list[int],
        loras: list[dict[str, Any]],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "seeds": seeds,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "scheduler": request.scheduler,
            "clip_skip": request.clip_skip,
            "prompt": encoded.info,
            "loras": loras,
            "model": {"name": self.model_name, "manifest_hash": self.model_hash},
            "device": {"device": self.plan.device, "offload": self.plan.offload, "dtype": str(self.dtype)},
            "timings": {key: round(value, 4) for key, value in timings.items()},
        }
        if self.is_dev_model:
            metadata["warning"] = DEV_MODEL_NOTICE
        return metadata

    def _clock(self) -> float:
        if self.plan.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
