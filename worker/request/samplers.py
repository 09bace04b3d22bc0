"""The scheduler names a request may give (A1111, diffusers and the official RunPod worker's), as data.

:data:`SCHEDULERS` is the one table of what a request may name: canonical A1111-style names, then
:data:`ALIASES` (the official worker's ``PNDM``, ``KLMS``, ``DDIM``, ``K_EULER``, ``K_EULER_ANCESTRAL``,
``DPMSolverMultistep``, ``DPMSolverSinglestep`` and diffusers' class names). Nothing here imports diffusers: the
schema validates names with it; :mod:`worker.generation.schedulers` builds the instances.
"""

from __future__ import annotations

from typing import Any

# canonical A1111-style name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM++ 3M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ 2S Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}

# Other spellings that clients send: the official worker's names and diffusers' class names.
ALIASES: dict[str, str] = {
    "K_EULER": "Euler",
    "K_EULER_ANCESTRAL": "Euler a",
    "KLMS": "LMS",
    "DPMSolverMultistep": "DPM++ 2M",
    "DPMSolverSinglestep": "DPM++ 2S",
    "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "DDPMScheduler": "DDPM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PNDM",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
}


# How many of A1111's prompt-editing steps one requested step counts: A1111 1.10 computes a prompt's schedule over
# steps x step_multiplier (processing.setup_conds), 2 for the samplers it declares second_order, and its denoiser's
# counter counts every model call. diffusers' step callback also fires after every model call, so its index is that
# counter when the schedule is computed over schedule_steps(name, steps). Checked against each diffusers class's number
# of model calls (tests/worker/test_prompt_samplers.py):
# - Heun, DPM2, DPM2 a, DPM++ SDE and their Karras forms: second_order in A1111 1.10 ("Karras" is a schedule type
#   there), and 2N - 1 model calls for N steps in diffusers too (two per step, one for the last): 2.
# - DPM++ 2S (diffusers' DPMSolverSinglestepScheduler): N model calls, each step one call (its second-order updates
#   reuse the previous call). A1111's second-order "DPM++ 2S a" is another sampler (ancestral, 2N - 1 calls); counting
#   2 here would leave the second half of every schedule unread, so it counts 1, like every multistep solver.
# - PNDM: N + 1 calls (the PLMS warm-up evaluates one timestep twice), as A1111's PLMS makes N + 1 on a schedule of
#   N; both count 1, and the extra call reads the schedule's last segment.
# - every other scheduler: N calls, 1.
_TWO_CALLS_PER_STEP = frozenset(
    {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
)
SCHEDULE_STEPS_PER_STEP: dict[str, int] = {
    name: 2 if class_name in _TWO_CALLS_PER_STEP else 1 for name, (class_name, _) in SCHEDULERS.items()
}


def schedule_steps(name: str, steps: int) -> int:
    """The steps A1111 1.10 computes a prompt-editing schedule over for ``steps`` requested steps of scheduler ``name``
    (any accepted spelling): ``steps`` times :data:`SCHEDULE_STEPS_PER_STEP`."""
    canonical = canonical_scheduler_name(name)
    if canonical is None:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}")
    return steps * SCHEDULE_STEPS_PER_STEP[canonical]


def calls_per_step(name: str) -> int:
    """Model calls per requested step of scheduler ``name`` (2 for the second-order ones, else 1)."""
    canonical = canonical_scheduler_name(name)
    return SCHEDULE_STEPS_PER_STEP[canonical] if canonical is not None else 1


# Schedulers that draw their noise from one seed per pipeline call (diffusers' DPMSolverSDEScheduler and its
# Brownian tree), not from the per-image generators: an image then depends on its batch mates.
PER_CALL_NOISE_SCHEDULERS: tuple[str, ...] = tuple(
    name for name, (class_name, _) in SCHEDULERS.items() if class_name == "DPMSolverSDEScheduler"
)


def _fold(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


_LOOKUP = {_fold(name): name for name in SCHEDULERS} | {_fold(alias): name for alias, name in ALIASES.items()}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def canonical_scheduler_name(name: str) -> str | None:
    """The canonical name for any accepted spelling (case and `_`/space insensitive), else None."""
    return _LOOKUP.get(_fold(name)) if isinstance(name, str) else None
