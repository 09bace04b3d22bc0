"""The model-dependent checks of a request: what the schema cannot know, refused before any LoRA, ControlNet or GPU
work, each error naming the field and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import InvalidRequest
from worker.generation.inpainting import check_inpainting
from worker.generation.routing import uses_refiner
from worker.generation.stage_schedules import StageSchedules
from worker.prompting.encoding import PromptEncoder
from worker.request.schema import GenerationRequest


@dataclass(frozen=True)
class RequestChecks:
    """What a loaded worker checks a request against: its prompt encoder's limits, its ControlNets and
    IP-Adapters, its model's family and schedules, whether it has a refiner."""

    prompt_encoder: PromptEncoder
    controlnets: Any  # worker.adapters.controlnet.manager.ControlNetManager
    ip_adapters: Any  # worker.adapters.ip_adapter.manager.IpAdapterManager
    hires: Any  # worker.generation.hires.HiresPass
    schedules: StageSchedules
    model_name: str
    is_inpainting_model: bool
    refiner_loaded: bool

    def check(self, request: GenerationRequest) -> None:
        self.prompt_encoder.check_clip_skip(request.clip_skip)  # before any LoRA or GPU work
        self.controlnets.check(request.controlnets)  # names and fit: JSON only, before anything loads
        self.ip_adapters.check(request.ip_adapters)  # names, fit and encoder: headers and JSON only
        check_inpainting(request, self.model_name, self.is_inpainting_model)
        refine = uses_refiner(request, self.refiner_loaded)
        self.schedules.check_sampling(request, refine)
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
            self.schedules.check_ensemble_split(request)
