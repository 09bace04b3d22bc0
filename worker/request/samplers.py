"""The samplers and schedule types a request may name, as data: the one table.

A request names a sampler and a schedule in one of two ways (:mod:`worker.request.sampling` holds the rule):

- A1111 1.9+ / Forge: ``sampler_name`` (:data:`SAMPLERS`, or an alias) + ``scheduler`` = a schedule type
  (:data:`SCHEDULES`). ``Automatic`` is what A1111 1.10 picks for that sampler (``Sampler.automatic``).
- the official RunPod worker: ``scheduler`` alone, a combined name: a sampler (``DDIM``, ``K_EULER``,
  ``DPMSolverMultistep``, ...), optionally followed by a schedule type (``DPM++ 2M Karras``, as A1111 < 1.9 and
  A1111 1.10's own parser split them). A bare sampler runs the model folder's own scheduler config
  (:data:`MODEL_SCHEDULE`), as the official worker and diffusers do.

Each sampler is one diffusers scheduler class with config overrides, and says what that class can do (diffusers
0.42.1: ``timestep_spacing``, ``use_karras/exponential/beta_sigmas``, custom ``timesteps``/``sigmas`` in
``set_timesteps``, ``eta`` in ``step``); a sampler/schedule pair exists when the class can run the schedule
(:func:`pair_problem`). ``tests/worker/test_samplers_table.py`` checks these claims against diffusers itself.
Nothing here imports diffusers: :mod:`worker.generation.schedulers` builds the instances.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MODEL_SCHEDULE = "model config"  # the model folder's scheduler_config.json as it is (the official worker's)
AUTOMATIC = "Automatic"


@dataclass(frozen=True)
class Sampler:
    diffusers_class: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # A1111 1.10's "Automatic" for this sampler (modules/sd_samplers_kdiffusion.py: its `scheduler` option, else
    # Uniform, k-diffusion's get_sigmas). Samplers A1111 runs on its own timestep loop (DDIM, PLMS, UniPC) or lacks
    # (DDPM, DEIS, DPM++ 2S) and LCM/TCD (their own schedules) run the model's config.
    automatic: str = MODEL_SCHEDULE
    # Model calls per step; A1111 1.10 counts prompt-editing steps over steps x this (its `second_order` samplers:
    # two model calls per step, 2N - 1 in all, in diffusers too; tests/worker/test_prompt_stages.py checks).
    calls_per_step: int = 1
    spacing: bool = True  # the class reads timestep_spacing (Uniform, Normal, SGM Uniform, DDIM)
    sigma_schedules: bool = False  # use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
    custom: frozenset[str] = frozenset()  # what set_timesteps takes: "timesteps", "sigmas"
    eta: float | None = None  # the step takes eta: its default here (None: it takes none)
    own_schedule: bool = False  # LCM/TCD place their own timesteps and ignore timestep_spacing
    aliases: tuple[str, ...] = ()


_TIMESTEPS, _BOTH = frozenset({"timesteps"}), frozenset({"timesteps", "sigmas"})
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# A1111 1.10's names where it has the sampler (its aliases too), then the official worker's and diffusers' class
# names. "DPM++ 2S" is diffusers' single-step solver (one model call per step), not A1111's ancestral "DPM++ 2S a".
SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler(
        "EulerDiscreteScheduler", automatic="Uniform", sigma_schedules=True, custom=_BOTH, aliases=("K_EULER",)
    ),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", automatic="Uniform", aliases=("K_EULER_ANCESTRAL",)),
    "LMS": Sampler("LMSDiscreteScheduler", automatic="Uniform", sigma_schedules=True, aliases=("KLMS", "k_lms")),
    "Heun": Sampler(
        "HeunDiscreteScheduler", automatic="Uniform", calls_per_step=2, sigma_schedules=True, custom=_TIMESTEPS
    ),
    "DPM2": Sampler("KDPM2DiscreteScheduler", automatic="Karras", calls_per_step=2, sigma_schedules=True),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", automatic="Karras", calls_per_step=2, sigma_schedules=True),
    "DPM++ 2M": Sampler(
        "DPMSolverMultistepScheduler",
        automatic="Karras",
        sigma_schedules=True,
        custom=_TIMESTEPS,
        aliases=("DPMSolverMultistep",),
    ),
    "DPM++ 2M SDE": Sampler(
        "DPMSolverMultistepScheduler", _SDE, automatic="Exponential", sigma_schedules=True, custom=_TIMESTEPS
    ),
    "DPM++ 3M SDE": Sampler(
        "DPMSolverMultistepScheduler",
        {**_SDE, "solver_order": 3},
        automatic="Exponential",
        sigma_schedules=True,
        custom=_TIMESTEPS,
    ),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", automatic="Karras", calls_per_step=2, sigma_schedules=True),
    "DPM++ 2S": Sampler(
        "DPMSolverSinglestepScheduler",
        spacing=False,
        sigma_schedules=True,
        custom=_TIMESTEPS,
        aliases=("DPMSolverSinglestep",),
    ),
    "DDIM": Sampler("DDIMScheduler", eta=0.0),  # A1111's eta_ddim default, diffusers' too
    "DDPM": Sampler("DDPMScheduler", custom=_TIMESTEPS),
    "PNDM": Sampler("PNDMScheduler", aliases=("PLMS",)),  # skip_prk_steps (SDXL's config): PLMS
    "UniPC": Sampler("UniPCMultistepScheduler", sigma_schedules=True),
    "DEIS": Sampler("DEISMultistepScheduler", sigma_schedules=True),
    "LCM": Sampler("LCMScheduler", custom=_TIMESTEPS, own_schedule=True),
    # TCD's gamma: 0.3, the TCD paper's and ComfyUI's SamplerTCD default (diffusers' pipelines would pass 0).
    "TCD": Sampler("TCDScheduler", custom=_TIMESTEPS, eta=0.3, own_schedule=True),
}

# A1111 1.10's k-diffusion aliases ("k_euler_a", "k_dpmpp_2m", ...), spelled from the labels where they follow them.
A1111_ALIASES = {
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "LCM": ("k_lcm",),
}

ScheduleKind = Literal["model", "spacing", "sigma_flag", "timesteps", "sigmas"]


@dataclass(frozen=True)
class ScheduleType:
    kind: ScheduleKind
    value: str | None  # the timestep_spacing, the use_*_sigmas flag, or the list's name
    does: str  # what it runs, for the README
    aliases: tuple[str, ...] = ()


# A1111 1.10's schedule types (modules/sd_schedulers.py: labels, names and aliases) that diffusers can run.
# Sigma-shaped ones take k-diffusion's range (sigma at t=0 to sigma at t=999): diffusers reads it from the
# spaced timesteps, so they run on linspace spacing (tests/worker/test_samplers_table.py compares with A1111's
# formulas). "KL Optimal" and "Karras Exponential" are not offered.
SCHEDULES: dict[str, ScheduleType] = {
    AUTOMATIC: ScheduleType("model", None, "the sampler's own: A1111 1.10's choice (the table's `Automatic` column)"),
    "Uniform": ScheduleType("spacing", "linspace", "timesteps evenly from 999 to 0 (k-diffusion's get_sigmas)"),
    "Karras": ScheduleType("sigma_flag", "use_karras_sigmas", "Karras et al. sigmas, rho 7"),
    "Exponential": ScheduleType("sigma_flag", "use_exponential_sigmas", "sigmas evenly in log space"),
    "Polyexponential": ScheduleType(
        "sigma_flag", "use_exponential_sigmas", "A1111's default rho 1: Exponential's sigmas exactly"
    ),
    "SGM Uniform": ScheduleType(
        "spacing",
        "trailing",
        "diffusers' trailing spacing: whole timesteps from 999 down by 1000/steps (SDXL-Lightning, Hyper-SD)",
        ("SGMUniform",),
    ),
    "Beta": ScheduleType("sigma_flag", "use_beta_sigmas", "beta-distribution sigmas, alpha = beta = 0.6"),
    "Align Your Steps": ScheduleType(
        "sigmas",
        "align_your_steps",
        "NVIDIA's SDXL sigmas (10 steps as published, log-linear for others; whole timesteps for samplers that "
        "take no sigmas)",
        ("AYS",),
    ),
    "Simple": ScheduleType("timesteps", "simple", "every (1000/steps)th training timestep from 999"),
    "Normal": ScheduleType("spacing", "linspace", "as Uniform (A1111 1.10's normal_scheduler)"),
    "DDIM": ScheduleType(
        "spacing", "leading", "diffusers' leading spacing with the model's steps_offset", ("ddim_uniform",)
    ),
}
SCHEDULE_NAMES = {  # A1111's internal names ("karras", "align_your_steps", ...), then other spellings
    label: tuple(dict.fromkeys((label.lower().replace(" ", "_"), *spec.aliases))) for label, spec in SCHEDULES.items()
}


@dataclass(frozen=True)
class Sampling:
    """A resolved sampler/schedule pair: what runs."""

    sampler: str  # a key of SAMPLERS
    schedule: str  # a key of SCHEDULES other than Automatic, or MODEL_SCHEDULE
    requested: str  # the schedule as asked for (Automatic, a label, or MODEL_SCHEDULE for a bare combined name)

    @property
    def spec(self) -> Sampler:
        return SAMPLERS[self.sampler]

    @property
    def schedule_type(self) -> ScheduleType | None:
        return None if self.schedule == MODEL_SCHEDULE else SCHEDULES[self.schedule]

    @property
    def per_call_noise(self) -> bool:
        """Its noise comes from one seed per pipeline call (DPMSolverSDEScheduler's Brownian tree), not from the
        per-image generators: an image then depends on its batch mates."""
        return self.spec.diffusers_class == "DPMSolverSDEScheduler"


def _fold(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


_SAMPLER_LOOKUP: dict[str, str] = {}
for _label, _spec in SAMPLERS.items():  # a class name means the first sampler of that class (DPM++ 2M, not 3M SDE)
    for _alias in (_label, *_spec.aliases, *A1111_ALIASES.get(_label, ()), _spec.diffusers_class):
        _SAMPLER_LOOKUP.setdefault(_fold(_alias), _label)
_SCHEDULE_LOOKUP = {_fold(name): label for label, names in SCHEDULE_NAMES.items() for name in (label, *names)}
# Longest first, so "Euler SGM Uniform" splits at "SGM Uniform", not "Uniform".
_SUFFIXES = sorted(((" " + key, label) for key, label in _SCHEDULE_LOOKUP.items()), key=lambda item: -len(item[0]))


def sampler_label(name: str) -> str | None:
    """The sampler a name means (any case, ``_`` or space), else None."""
    return _SAMPLER_LOOKUP.get(_fold(name)) if isinstance(name, str) else None


def schedule_label(name: str) -> str | None:
    """The schedule type a name means (label, A1111's internal name or an alias; any case), else None."""
    return _SCHEDULE_LOOKUP.get(_fold(name)) if isinstance(name, str) else None


@functools.lru_cache(maxsize=512)
def split_combined(name: str) -> tuple[str, str | None] | None:
    """``(sampler, schedule or None)`` for a combined name (``DPM++ 2M Karras``, ``K_EULER``), else None.

    As A1111 1.10's get_sampler_and_scheduler: a trailing schedule type is split off; a whole sampler name wins.
    """
    if not isinstance(name, str):
        return None
    whole = sampler_label(name)
    if whole is not None:
        return whole, None
    folded = _fold(name)
    for suffix, schedule in _SUFFIXES:
        if folded.endswith(suffix) and schedule != AUTOMATIC:
            sampler = sampler_label(folded[: -len(suffix)])
            if sampler is not None:
                return sampler, schedule
    return None


def combined_name(sampler: str, schedule: str | None) -> str:
    return sampler if schedule in (None, MODEL_SCHEDULE) else f"{sampler} {schedule}"


def resolve(sampler: str, schedule: str) -> Sampling:
    """The pair that runs for a sampler label and a schedule label (Automatic becomes the sampler's own)."""
    concrete = SAMPLERS[sampler].automatic if schedule == AUTOMATIC else schedule
    return Sampling(sampler, concrete, schedule)


def samplers_taking(schedule: str) -> list[str]:
    return [name for name in SAMPLERS if pair_problem(name, schedule) is None]


def schedules_of(sampler: str) -> list[str]:
    return [name for name in SCHEDULES if pair_problem(sampler, name) is None]


def pair_problem(sampler: str, schedule: str) -> str | None:
    """Why diffusers cannot run ``schedule`` with ``sampler`` (both labels), or None when the pair exists."""
    spec = SAMPLERS[sampler]
    if schedule in (AUTOMATIC, MODEL_SCHEDULE):
        return None
    kind = SCHEDULES[schedule].kind
    cls = f"diffusers' {spec.diffusers_class}"
    if kind == "spacing" and (spec.own_schedule or not spec.spacing):
        return f"{cls} places its own timesteps (it has no timestep spacing)"
    if kind == "sigma_flag" and not spec.sigma_schedules:
        return f"{cls} cannot take {schedule} sigmas"
    if kind == "timesteps" and "timesteps" not in spec.custom:
        return f"{cls} takes no custom timesteps"
    if kind == "sigmas" and not spec.custom:
        return f"{cls} takes neither custom sigmas nor custom timesteps"
    return None


def custom_list_problem(sampler: str, kind: Literal["timesteps", "sigmas"]) -> str | None:
    """Why ``sampler`` cannot take a request's own ``timesteps`` or ``sigmas`` list, or None."""
    spec = SAMPLERS[sampler]
    if kind in spec.custom:
        return None
    takers = ", ".join(name for name, other in SAMPLERS.items() if kind in other.custom)
    return f"diffusers' {spec.diffusers_class} takes no custom {kind}; samplers that do: {takers}"


def schedule_steps(name: str, steps: int) -> int:
    """The steps A1111 1.10 computes a prompt-editing schedule over for ``steps`` requested steps of sampler
    ``name`` (a label, an alias or a combined name): ``steps`` times :attr:`Sampler.calls_per_step`."""
    return steps * calls_per_step(name)


def calls_per_step(name: str) -> int:
    """Model calls per requested step of sampler ``name`` (2 for the second-order ones, else 1)."""
    parts = split_combined(name)
    if parts is None:
        raise ValueError(f"unknown sampler {name!r}; use one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[parts[0]].calls_per_step
