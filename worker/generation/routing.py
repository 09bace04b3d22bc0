"""Which models a job runs through: decided from the request and what this worker loaded, before any work."""

from __future__ import annotations

from core.errors import InvalidRequest
from worker.request.samplers import schedule_steps
from worker.request.schema import GenerationRequest


def uses_refiner(request: GenerationRequest, refiner_loaded: bool) -> bool:
    """Whether this request runs the refiner: the official worker refines every text-to-image job."""
    if request.refiner and not refiner_loaded:
        raise InvalidRequest(
            "refiner: true, but this worker has no refiner loaded; set REFINER_DIR (or REFINER_NAME) to a "
            "converted SDXL refiner, or leave refiner out"
        )
    if request.is_img2img:
        return bool(request.refiner)  # img2img runs on the base unless the request asks for the refiner
    return refiner_loaded if request.refiner is None else request.refiner


def prompt_schedule_steps(request: GenerationRequest, refiner_loaded: bool) -> int:
    """The steps A1111 1.10 computes the prompt-editing schedule over: those of the model that runs first (the
    refiner's for img2img through it, as A1111's img2img schedules over the requested steps), times 2 for the
    schedulers that make two model calls per step (:func:`worker.request.samplers.schedule_steps`)."""
    refiner_first = request.is_img2img and uses_refiner(request, refiner_loaded)
    steps = request.refiner_inference_steps if refiner_first else request.num_inference_steps
    return schedule_steps(request.sampling.sampler, steps)
