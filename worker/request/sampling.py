"""The sampling fields: which sampler and schedule run, custom timesteps or sigmas, eta, guidance rescale.

The rule for ``scheduler`` (both kinds of client work unchanged):

- **with** ``sampler_name`` (A1111 1.9+, Forge), ``scheduler`` is A1111's schedule type (``Karras``,
  ``SGM Uniform``, ...; absent or null: ``Automatic``). A combined ``sampler_name`` (``DPM++ 2M Karras``) is split
  as A1111 1.10 splits it; a ``scheduler`` naming another schedule than its suffix is refused.
- **without** it (the official RunPod worker), ``scheduler`` is a combined name: a sampler alone (``DDIM``,
  ``K_EULER``: the model's own scheduler config, as the official worker runs it) or sampler + schedule type
  (``DPM++ 2M Karras``).

Names are stored canonical (``k_euler`` becomes ``Euler``; with ``sampler_name``, ``scheduler`` holds the schedule
label), and :attr:`SamplingFields.sampling` is the pair that runs. The table is :mod:`worker.request.samplers`.
"""

from __future__ import annotations

import functools
import itertools
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from worker.request.fields import GROUP, MAX_STEPS, REQUEST_CONFIG, number_from_int
from worker.request.samplers import (
    AUTOMATIC,
    MODEL_SCHEDULE,
    SAMPLERS,
    SCHEDULES,
    Sampling,
    combined_name,
    custom_list_problem,
    pair_problem,
    resolve,
    samplers_taking,
    schedule_label,
    schedules_of,
    split_combined,
)

MAX_TIMESTEP = 999  # SDXL's 1000 training timesteps (the engine checks the model's own count)
MAX_SIGMA = 10_000.0  # SDXL's largest is 14.6; a zero-terminal-SNR schedule's first is ~4096 in diffusers
MAX_NAME_CHARS = 64

Timestep = Annotated[int, Field(ge=0, le=MAX_TIMESTEP)]
Sigma = Annotated[float, Field(ge=0.0, le=MAX_SIGMA, allow_inf_nan=False)]


class SamplingFields(BaseModel):
    """A request's sampler, schedule and sampling options (a field group of :class:`GenerationRequest`)."""

    model_config = REQUEST_CONFIG

    sampler_name: Annotated[
        str | None,
        GROUP,
        Field(
            max_length=MAX_NAME_CHARS,
            description="A1111's sampler (table below); when sent, `scheduler` is A1111's schedule type",
        ),
    ] = None
    scheduler: Annotated[
        str | None,
        GROUP,
        Field(
            max_length=MAX_NAME_CHARS,
            description="without sampler_name: the official worker's name, a sampler optionally with a schedule "
            "type (`DDIM`, `K_EULER`, `DPM++ 2M Karras`); with sampler_name: the schedule type (none: Automatic)",
        ),
    ] = "DDIM"
    timesteps: Annotated[
        list[Timestep] | None,
        GROUP,
        Field(
            min_length=1,
            max_length=MAX_STEPS,
            description="custom timesteps instead of a schedule: one per step (num_inference_steps of them), "
            "strictly decreasing, 0..999",
        ),
    ] = None
    sigmas: Annotated[
        list[Sigma] | None,
        GROUP,
        Field(
            min_length=2,
            max_length=MAX_STEPS + 1,
            description="custom sigmas instead of a schedule (Euler): num_inference_steps + 1 values, strictly "
            "decreasing, the last the final noise level (usually 0)",
        ),
    ] = None
    eta: Annotated[
        float | None,
        GROUP,
        Field(ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM's eta, TCD's gamma; none: 0 (DDIM), 0.3 (TCD)"),
    ] = None
    guidance_rescale: Annotated[
        float,
        GROUP,
        Field(
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="rescales the guided prediction (0.7 for v-prediction / zero-terminal-SNR models, as in "
            "their paper); 0: off",
        ),
    ] = 0.0

    _sampling_floats = field_validator("eta", "guidance_rescale", mode="before")(number_from_int)

    @field_validator("sigmas", mode="before")
    @classmethod
    def _sigma_ints_are_floats(cls, value: Any) -> Any:
        return [number_from_int(item) for item in value] if isinstance(value, list) else value

    @field_validator("timesteps", "sigmas")
    @classmethod
    def _strictly_decreasing(cls, value: list | None) -> list | None:
        if value is not None and any(later >= earlier for earlier, later in itertools.pairwise(value)):
            raise ValueError("must be strictly decreasing (noisiest first), one value per step")
        return value

    @model_validator(mode="before")
    @classmethod
    def _canonical_names(cls, data: Any) -> Any:
        """Store names canonical; anything unknown or contradictory is left for :meth:`_pair_exists` to name."""
        if not isinstance(data, dict):
            return data
        sampler_name, scheduler = data.get("sampler_name"), data.get("scheduler")
        if isinstance(sampler_name, str):
            parts = split_combined(sampler_name)
            if parts is None:
                return data
            schedule = AUTOMATIC if scheduler is None else schedule_label(scheduler)
            if schedule is None:
                return {**data, "sampler_name": parts[0]}
            if parts[1] is not None and schedule not in (AUTOMATIC, parts[1]):
                return data  # two schedules asked for: refused with both fields named
            return {**data, "sampler_name": parts[0], "scheduler": parts[1] or schedule}
        if sampler_name is None and isinstance(scheduler, str) and (parts := split_combined(scheduler)):
            return {**data, "scheduler": combined_name(*parts)}
        return data

    @property
    def sampling(self) -> Sampling:
        """The sampler and schedule that run (see the module docstring for the rule)."""
        return _resolve(self.sampler_name, self.scheduler)

    @model_validator(mode="after")
    def _pair_exists(self) -> SamplingFields:
        sampling = self.sampling  # raises, naming the fields, for a name or pair that does not exist
        for kind in ("timesteps", "sigmas"):
            if getattr(self, kind) is None:
                continue
            if self.timesteps is not None and self.sigmas is not None:
                raise ValueError("timesteps, sigmas: give one custom list, not both")
            problem = custom_list_problem(sampling.sampler, kind)
            if problem:
                raise ValueError(f"{kind}: sampler {sampling.sampler!r} cannot take them: {problem}")
            if sampling.requested not in (AUTOMATIC, MODEL_SCHEDULE):
                raise ValueError(
                    f"{kind}: a custom list replaces the schedule, but scheduler asks for {sampling.requested!r}; "
                    "leave the schedule type out (Automatic), or send the sampler alone"
                )
        if self.eta is not None and sampling.spec.eta is None:
            takers = ", ".join(name for name, spec in SAMPLERS.items() if spec.eta is not None)
            raise ValueError(
                f"eta: sampler {sampling.sampler!r} takes no eta (only {takers} do in diffusers; A1111's eta for "
                "ancestral samplers has no counterpart there); leave eta out"
            )
        return self


@functools.lru_cache(maxsize=512)
def _resolve(sampler_name: str | None, scheduler: str | None) -> Sampling:
    """The pair for a request's two (canonical) fields, or a ValueError naming the fields and the fix."""
    if sampler_name is None:
        parts = split_combined(scheduler) if scheduler is not None else split_combined("DDIM")
        if parts is None:
            hint = (
                f"{scheduler!r} is a schedule type: send it with sampler_name, as A1111 does "
                f'(e.g. "sampler_name": "DPM++ 2M", "scheduler": "{schedule_label(scheduler)}")'
                if schedule_label(scheduler) is not None
                else "use a sampler name, optionally followed by a schedule type "
                f"(e.g. DPM++ 2M Karras); samplers: {', '.join(SAMPLERS)}"
            )
            raise ValueError(f"scheduler: unknown scheduler {scheduler!r}; {hint}")
        sampler, schedule = parts
        problem = pair_problem(sampler, schedule) if schedule else None
        if problem:
            raise ValueError(f"scheduler: {scheduler!r} does not exist: {problem}; {_fixes(sampler, schedule)}")
        return resolve(sampler, schedule) if schedule else Sampling(sampler, MODEL_SCHEDULE, MODEL_SCHEDULE)
    if sampler_name not in SAMPLERS:
        parts = split_combined(sampler_name)
        if parts is not None and parts[1] is not None:  # "DPM++ 2M Karras" with another schedule type
            raise ValueError(
                f"sampler_name {sampler_name!r} names the {parts[1]} schedule but scheduler asks for {scheduler!r}; "
                f"send sampler_name {parts[0]!r} with the scheduler you want"
            )
        raise ValueError(f"sampler_name: unknown sampler {sampler_name!r}; use one of: {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULES:
        raise ValueError(
            f"scheduler: unknown schedule type {scheduler!r} (with sampler_name, scheduler is A1111's schedule type); "
            f"use one of: {', '.join(SCHEDULES)}"
        )
    problem = pair_problem(sampler_name, scheduler)
    if problem:
        raise ValueError(
            f"sampler_name {sampler_name!r} with scheduler {scheduler!r}: this pair does not exist ({problem}); "
            f"{_fixes(sampler_name, scheduler)}"
        )
    return resolve(sampler_name, scheduler)


def _fixes(sampler: str, schedule: str) -> str:
    return (
        f"{sampler} takes the schedule types {', '.join(schedules_of(sampler))}; "
        f"{schedule} runs with {', '.join(samplers_taking(schedule)) or 'no sampler'}"
    )
