"""A fresh scheduler per pipeline call, built from the model's own scheduler config, and the schedule it runs.

A scheduler keeps state between steps (timesteps, step index, the multistep history), so a shared instance would let
one job leak into the next; and each call starts from the model folder's config as loaded, so one job's overrides
(Karras sigmas, trailing spacing) never reach the next. The model's ``prediction_type`` and
``rescale_betas_zero_snr`` (v-prediction, zero terminal SNR) are kept for every sampler; a sampler whose diffusers
class cannot keep them is refused rather than run on the wrong noise schedule. What the names mean is
:mod:`worker.request.samplers`' table.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import InvalidRequest
from worker.request.samplers import MODEL_SCHEDULE, SAMPLERS, Sampling, split_combined

SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# What a model's scheduler config says about the model itself (not about how to sample it): kept for every sampler.
MODEL_KEYS = ("prediction_type", "rescale_betas_zero_snr")
# NVIDIA's published 10-step SDXL noise levels (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html, as in
# A1111 1.10's sd_schedulers.py; diffusers' AysSchedules holds the same list with the last set to 0).
AYS_SDXL_SIGMAS = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


@dataclass
class Schedule:
    """A fresh scheduler for one pipeline call and what the call passes with it."""

    scheduler: Any
    steps: int
    spacing: str  # what placed the timesteps: leading/linspace/trailing, karras/exponential/beta, a list
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    eta: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline call's ``timesteps``/``sigmas`` (instead of the spacing) and ``eta``, where they apply."""
        kwargs: dict[str, Any] = {}
        if self.timesteps is not None:
            kwargs["timesteps"] = list(self.timesteps)
        if self.sigmas is not None:
            kwargs["sigmas"] = list(self.sigmas)
        if self.eta is not None:
            kwargs["eta"] = self.eta
        return kwargs

    def probe(self) -> Any:
        """A copy of the scheduler with its timesteps set, to count a call's steps before making it."""
        probe = copy.deepcopy(self.scheduler)
        if self.timesteps is not None:
            probe.set_timesteps(timesteps=list(self.timesteps), device="cpu")
        elif self.sigmas is not None:
            probe.set_timesteps(sigmas=list(self.sigmas), device="cpu")
        else:
            probe.set_timesteps(self.steps, device="cpu")
        return probe


def build_schedule(
    sampling: Sampling,
    model_scheduler_config: dict[str, Any],
    steps: int,
    *,
    noise_seed: int | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    eta: float | None = None,
    field_name: str = "scheduler",
) -> Schedule:
    """The scheduler and schedule of ``sampling`` for a ``steps``-step call on a model with this scheduler config.

    ``timesteps``/``sigmas`` (a request's own list) replace the schedule. ``noise_seed`` seeds the per-call noise
    of DPMSolverSDEScheduler (otherwise drawn from torch's global generator: the same request would give another
    image each time). ``field_name`` is the request field a refusal names.
    """
    spec = sampling.spec
    overrides: dict[str, Any] = dict(spec.overrides)
    kind = sampling.schedule_type.kind if sampling.schedule_type is not None else "model"
    if timesteps is not None or sigmas is not None:
        kind = "custom"
    if spec.sigma_schedules and kind != "model":  # off unless asked for, whatever the model's config says
        overrides.update(dict.fromkeys(SIGMA_FLAGS, False))
    if kind == "spacing":
        overrides["timestep_spacing"] = sampling.schedule_type.value
    elif kind == "sigma_flag":
        overrides[sampling.schedule_type.value] = True
        if spec.spacing:  # k-diffusion's sigma range (t = 0..999): diffusers reads it from the spaced timesteps
            overrides["timestep_spacing"] = "linspace"
    if sampling.per_call_noise and noise_seed is not None:
        overrides["noise_sampler_seed"] = noise_seed
    # Only the keys the class takes: diffusers warns at every build about the others (skip_prk_steps for LCM).
    accepted = _config_keys(spec.diffusers_class)
    config = {key: value for key, value in model_scheduler_config.items() if key in accepted or key.startswith("_")}
    scheduler = copy.deepcopy(_prototype(spec.diffusers_class, json.dumps({**config, **overrides}, sort_keys=True)))
    _check_model_kept(sampling, model_scheduler_config, scheduler, field_name)
    schedule = Schedule(scheduler, steps, _spacing_name(sampling, scheduler, kind))
    if kind == "custom":
        schedule.timesteps, schedule.sigmas = timesteps, sigmas
        schedule.spacing = "custom timesteps" if timesteps is not None else "custom sigmas"
    elif kind in ("timesteps", "sigmas"):
        schedule.spacing = f"{sampling.schedule} {'sigmas' if kind == 'sigmas' else 'timesteps'}"
    if kind == "timesteps":  # Simple: A1111 1.10's simple_scheduler, every (T/steps)th training timestep from T-1
        train = scheduler.config.num_train_timesteps
        schedule.timesteps = [train - 1 - int(k * train / steps) for k in range(steps)]
    elif kind == "sigmas":  # Align Your Steps
        schedule.sigmas = align_your_steps(steps)
        if "sigmas" not in spec.custom:
            schedule.timesteps = whole_timesteps(scheduler, schedule.sigmas[:-1], field_name, sampling)
            schedule.sigmas, schedule.spacing = None, f"{sampling.schedule} timesteps"
    if schedule.timesteps is not None:
        train = scheduler.config.num_train_timesteps
        if max(schedule.timesteps) >= train:
            raise InvalidRequest(f"timesteps: this model has {train} training timesteps: each must be 0..{train - 1}")
    if spec.eta is not None:
        schedule.eta = spec.eta if eta is None else eta
    return schedule


def _spacing_name(sampling: Sampling, scheduler: Any, kind: str) -> str:
    if kind == "sigma_flag":
        return sampling.schedule_type.value.removeprefix("use_").removesuffix("_sigmas")
    if sampling.spec.own_schedule:
        return f"{sampling.sampler}'s own"
    return str(scheduler.config.get("timestep_spacing", "linspace"))  # DPM++ 2S has none: linspace


def _check_model_kept(sampling: Sampling, model_config: dict[str, Any], scheduler: Any, field_name: str) -> None:
    """Refuse a sampler whose diffusers class drops what the model's config says about the model itself."""
    for key in MODEL_KEYS:
        wanted = model_config.get(key)
        if wanted in (None, False) or (key == "prediction_type" and wanted == "epsilon"):
            continue
        if scheduler.config.get(key) != wanted:
            able = ", ".join(name for name, spec in SAMPLERS.items() if key in _config_keys(spec.diffusers_class))
            raise InvalidRequest(
                f"{field_name}: sampler {sampling.sampler!r} cannot run this model ({key}: {wanted!r} in its "
                f"scheduler config; diffusers' {sampling.spec.diffusers_class} has no such option and would sample "
                f"the wrong noise schedule); use one of: {able}"
            )


@functools.lru_cache(maxsize=32)
def _prototype(class_name: str, config_json: str) -> Any:
    """A scheduler as constructed from this config, never stepped: each call gets a deep copy of it.

    Construction costs ~1 s for the classes that set 1000 timesteps in their ``__init__`` (KDPM2 and others); a copy
    of the unstepped instance is the same object state for a fraction of that.
    """
    import diffusers

    return getattr(diffusers, class_name).from_config(json.loads(config_json))


@functools.lru_cache(maxsize=64)
def _config_keys(class_name: str) -> frozenset[str]:
    import inspect

    import diffusers

    return frozenset(inspect.signature(getattr(diffusers, class_name).__init__).parameters)


def align_your_steps(steps: int) -> list[float]:
    """Align Your Steps' SDXL sigmas for ``steps`` steps: ``steps + 1`` values, the last 0.

    The published 10-step list as is; for other counts, log-linear interpolation of it (NVIDIA's ``loglinear_interp``,
    as ComfyUI's AlignYourStepsScheduler and diffusers' docs use it). A1111 1.10 differs: it interpolates to ``steps``
    values and appends 0, even at 10 steps.
    """
    published = np.array(AYS_SDXL_SIGMAS, dtype=np.float64)
    if steps + 1 != len(published):
        known = np.linspace(0, 1, len(published))
        wanted = np.linspace(0, 1, steps + 1)
        published = np.exp(np.interp(wanted, known, np.log(published[::-1])))[::-1]
    return [float(sigma) for sigma in published[:-1]] + [0.0]


def whole_timesteps(scheduler: Any, sigmas: list[float], field_name: str, sampling: Sampling) -> list[int]:
    """The model's whole training timesteps nearest to ``sigmas`` (log-sigma interpolation, as diffusers'
    ``_sigma_to_t``), for samplers that take timesteps but not sigmas. At 10 steps this gives diffusers' published
    AysSchedules["StableDiffusionXLTimesteps"] exactly (tests/worker/test_samplers_table.py)."""
    alphas = scheduler.alphas_cumprod.double().numpy()
    log_sigmas = np.log(np.maximum(((1 - alphas) / alphas) ** 0.5, 1e-10))
    ts = np.interp(np.log(np.asarray(sigmas, dtype=np.float64)), log_sigmas, np.arange(len(log_sigmas)))
    whole = [int(t) for t in np.round(ts)]
    if any(later >= earlier for earlier, later in itertools.pairwise(whole)):
        raise InvalidRequest(
            f"{field_name}: {sampling.schedule} at {len(sigmas)} steps repeats a whole timestep for sampler "
            f"{sampling.sampler!r} (it takes timesteps, not sigmas); use fewer steps or Euler (it takes sigmas)"
        )
    return whole


def build_scheduler(name: str, model_scheduler_config: dict[str, Any], noise_seed: int | None = None) -> Any:
    """A new scheduler of combined name ``name`` (``Euler``, ``DPM++ 2M Karras``) from the model's config."""
    from worker.request.samplers import resolve

    parts = split_combined(name)
    if parts is None:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SAMPLERS)}")
    sampling = resolve(*parts) if parts[1] else Sampling(parts[0], MODEL_SCHEDULE, MODEL_SCHEDULE)
    return build_schedule(sampling, model_scheduler_config, 1, noise_seed=noise_seed).scheduler
