"""A job's noise schedules and the checks on them: fresh schedulers for the base and the refiner, built from each
model's own config as loaded, and the refusals a request's sampling earns before any GPU work.

Every stage gets a fresh :class:`.schedulers.Schedule`: a pipeline's current scheduler is the previous job's, and
reading a config back from it would carry one job's overrides (Karras sigmas, a custom list) into the next.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from core.errors import InvalidRequest
from worker.generation.schedulers import Schedule, build_schedule
from worker.request.schema import GenerationRequest


def request_schedule(
    request: GenerationRequest, config: dict[str, Any], steps: int, seed: int | None, custom: bool = True
) -> Schedule:
    """``request``'s sampler and schedule type over ``steps`` steps of the model whose scheduler config is
    ``config``; ``custom``: whether the request's own timesteps/sigmas apply (they are for the base's steps)."""
    return build_schedule(
        request.sampling,
        config,
        steps,
        noise_seed=seed,
        timesteps=request.timesteps if custom else None,
        sigmas=request.sigmas if custom else None,
        eta=request.eta,
        field_name="sampler_name" if request.sampler_name is not None else "scheduler",
    )


def img2img_calls(
    pipeline_class: Any, schedule: Schedule, steps: int, strength: float, denoising_start: float | None
) -> tuple[int, int]:
    """(model calls of the full ``steps``-step schedule, calls an img2img-pipeline call leaves out before its first
    one for ``strength`` or ``denoising_start``), by diffusers' own ``get_timesteps`` on a copy of the schedule's
    scheduler: known before the call, so the refiner's first call gets its conditioning as an argument."""
    probe = schedule.probe()
    holder = SimpleNamespace(scheduler=probe)
    timesteps, _ = pipeline_class.get_timesteps(holder, steps, strength, "cpu", denoising_start=denoising_start)
    return len(probe.timesteps), len(probe.timesteps) - len(timesteps)


class StageSchedules:
    """The base's and the refiner's scheduler configs as loaded, and the schedules built from them."""

    def __init__(self, base_config: dict[str, Any], refiner: Any | None) -> None:
        self.base_config = base_config
        self.refiner_class = type(refiner) if refiner is not None else None
        self.refiner_config = dict(refiner.scheduler.config) if refiner is not None else None

    def base(self, request: GenerationRequest, steps: int, seed: int | None) -> Schedule:
        return request_schedule(request, self.base_config, steps, seed)

    def refiner(self, request: GenerationRequest, seed: int) -> Schedule:
        """A request's own timesteps or sigmas are for the base's steps (:meth:`check_sampling` refuses them here)."""
        if self.refiner_config is None:
            raise InvalidRequest("this worker has no refiner loaded; set REFINER_DIR, or leave refiner out")
        return request_schedule(request, self.refiner_config, request.refiner_inference_steps, seed, False)

    def check_sampling(self, request: GenerationRequest, refine: bool) -> None:
        """Refuse, before any work, a sampler this model's config cannot run (v-prediction, zero terminal SNR) and
        a custom list the refiner would have to run too."""
        self.base(request, request.num_inference_steps, None)
        if refine:
            if request.timesteps is not None or request.sigmas is not None:
                name = "timesteps" if request.timesteps is not None else "sigmas"
                raise InvalidRequest(
                    f"{name}: a custom list is for the base model's num_inference_steps, but this job runs the "
                    "refiner too; send refiner: false, or a schedule type instead of the list"
                )
            self.refiner(request, 0)

    def check_ensemble_split(self, request: GenerationRequest) -> None:
        """Refuse a ``high_noise_frac`` that leaves the base or the refiner no model call (issue 24: 0.999999 ran no
        refiner step and reported it used)."""
        frac = request.high_noise_frac
        base = self.base(request, request.num_inference_steps, None).probe()
        # diffusers' StableDiffusionXLPipeline (8.1, denoising_end): the base runs the timesteps at or above this.
        train = base.config.num_train_timesteps
        base_calls = int((base.timesteps >= round(train - frac * train)).sum())
        steps = request.refiner_inference_steps
        total, skipped = img2img_calls(self.refiner_class, self.refiner(request, 0), steps, request.strength, frac)
        if base_calls < 1:
            raise InvalidRequest(
                f"high_noise_frac: {frac:g} with num_inference_steps {request.num_inference_steps} leaves the base "
                "model no denoising step (it would hand pure noise to the refiner); raise high_noise_frac or "
                "num_inference_steps"
            )
        if total - skipped < 1:
            raise InvalidRequest(
                f"high_noise_frac: {frac:g} with refiner_inference_steps {steps} leaves the refiner no denoising "
                "step; lower high_noise_frac, raise refiner_inference_steps, or leave high_noise_frac out to "
                "refine the finished image at strength"
            )
