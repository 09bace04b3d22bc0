"""A job's metadata: what it asked for and what ran (stable), and what depends on this worker (volatile)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.results import GenerationMetadata, Timings
from model_build.dev_model import DEV_MODEL_NOTICE
from worker.adapters.lora.manager import AppliedLora
from worker.generation.conditioning import Stage
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.stepping import texts_per_call
from worker.request.schema import GenerationRequest


@dataclass(frozen=True)
class ServingFacts:
    """What the engine serves with: the same for every job of a worker."""

    model_name: str
    model_hash: str
    is_dev_model: bool
    device: str
    offload: str
    dtype: str
    speedups: dict[str, Any]
    refiner_info: dict[str, Any] | None
    refiner_loaded: bool


def refiner_metadata(
    request: GenerationRequest, refine: bool, stages: Sequence[Stage], facts: ServingFacts
) -> dict[str, Any]:
    """What the refiner did: how it was entered (and the setting that decided it), the steps it ran."""
    if refine:
        ran = stages[-1]
        if request.is_img2img:
            mode, frac, strength = "img2img", None, request.strength
        elif request.high_noise_frac is not None and not request.enable_hr:
            mode, frac, strength = "ensemble", request.high_noise_frac, None
        else:
            mode, frac, strength = "refine", None, request.strength
        info: dict[str, Any] = {
            "used": True,
            "model": facts.refiner_info,
            "mode": mode,  # ensemble of experts, refining the base's image at strength, or img2img
            "refiner_inference_steps": request.refiner_inference_steps,
            "high_noise_frac": frac,
            "strength": strength,
            "steps": ran.steps_run,
            "model_calls": ran.counter.calls,
        }
        if (request.is_img2img or request.enable_hr) and request.high_noise_frac is not None:
            info["ignored"] = {
                "high_noise_frac": request.high_noise_frac,
                "reason": "img2img through the refiner starts at strength, not at a fraction of a base run"
                if request.is_img2img
                else "after the hires pass the refiner refines its result at strength",
            }
        return {"refiner": info}
    if request.refiner is False:
        reason = "the request set refiner: false"
    elif not facts.refiner_loaded:
        reason = "no refiner is loaded on this worker (set REFINER_DIR or REFINER_NAME to use one)"
    elif request.is_inpainting:
        reason = "inpainting runs on the base model (A1111's hand-over to the refiner mid-way is not done here)"
    else:
        reason = "img2img runs on the base model unless the request sets refiner: true"
    return {"refiner": {"used": False, "reason": reason}}


def sampling_metadata(
    request: GenerationRequest, stages: Sequence[Stage], model_scheduler_config: dict[str, Any]
) -> dict[str, Any]:
    """What sampled: the sampler, the schedule type (Automatic resolved) or custom list, what placed the timesteps
    (each stage lists the timesteps its model calls ran), eta, and what the model's config says about the model."""
    sampling = request.sampling
    custom = "timesteps" if request.timesteps is not None else "sigmas" if request.sigmas is not None else None
    spec_eta = sampling.spec.eta
    return {
        "sampler": sampling.sampler,
        "schedule": f"custom {custom}" if custom else sampling.schedule,
        "schedule_requested": sampling.requested,
        "spacing": stages[0].spacing,
        "eta": None if spec_eta is None else (spec_eta if request.eta is None else request.eta),
        "prediction_type": model_scheduler_config.get("prediction_type", "epsilon"),
        "rescale_betas_zero_snr": bool(model_scheduler_config.get("rescale_betas_zero_snr", False)),
    }


def describe_schedule_calls(encoded: EncodedPrompts, stages: Sequence[Stage]) -> None:
    """Add to an edited prompt's metadata which text each stage's model calls read."""
    schedule = encoded.info.get("schedule")
    if schedule is None or not encoded.is_scheduled:
        return
    schedule["calls"] = [
        {"model": stage.model, "runs": texts_per_call(encoded, stage.steps, stage.counter.calls)} for stage in stages
    ]


def job_metadata(
    request: GenerationRequest,
    encoded: EncodedPrompts,
    seeds: list[int],
    loras: Sequence[AppliedLora],
    timings: Timings,
    size: tuple[int, int],
    run_info: dict[str, Any],
    facts: ServingFacts,
    cache_info: dict[str, Any] | None = None,
) -> GenerationMetadata:
    """One request's metadata (a request of a shared call gets its own seeds and prompt facts, the call's run)."""
    prompt_info = dict(encoded.info)
    cache_hit = prompt_info.pop("cache_hit", None)
    embeddings = prompt_info.pop("embeddings", [])
    stable: dict[str, Any] = {
        "seeds": seeds,
        "width": size[0],
        "height": size[1],
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "guidance_rescale": request.guidance_rescale,
        "scheduler": request.scheduler,
        "clip_skip": request.clip_skip,
        "prompt": prompt_info,
        "loras": [lora.stable() for lora in loras],
        "embeddings": embeddings,  # the textual inversions the prompts named: name, file, sha256, vectors
        "model": {"name": facts.model_name, "manifest_hash": facts.model_hash},
        "output_format": request.output_format,
        **run_info,
    }
    if facts.is_dev_model:
        stable["warning"] = DEV_MODEL_NOTICE
    volatile: dict[str, Any] = {
        "device": {"device": facts.device, "offload": facts.offload, "dtype": facts.dtype, "speedups": facts.speedups},
        # cache_info: other adapters' cache facts (the ControlNets loaded or reused), by kind
        "cache": {"prompt": cache_hit, "loras": [lora.volatile() for lora in loras], **(cache_info or {})},
    }
    return GenerationMetadata(stable=stable, timings=timings, volatile=volatile)
