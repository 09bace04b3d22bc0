"""A fresh scheduler per job, built from the model's own scheduler config.

A scheduler keeps state between steps (timesteps, step index, the multistep history), so a shared instance would let
one job leak into the next. The names it accepts are :mod:`worker.request.samplers`' table.
"""

from __future__ import annotations

from typing import Any

from worker.request.samplers import PER_CALL_NOISE_SCHEDULERS, SCHEDULERS, canonical_scheduler_name


def build_scheduler(name: str, model_scheduler_config: dict[str, Any], noise_seed: int | None = None) -> Any:
    """A new scheduler instance of ``name`` from the model's scheduler config.

    ``noise_seed`` seeds the per-call noise of :data:`PER_CALL_NOISE_SCHEDULERS` (otherwise drawn from torch's
    global generator, so the same request would give another image each time); others take their noise from
    the pipeline's generators and ignore it.
    """
    canonical = canonical_scheduler_name(name)
    if canonical is None:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}")
    import diffusers  # here, not at the top: importing diffusers costs seconds

    class_name, overrides = SCHEDULERS[canonical]
    scheduler_class = getattr(diffusers, class_name)
    if canonical in PER_CALL_NOISE_SCHEDULERS and noise_seed is not None:
        overrides = {**overrides, "noise_sampler_seed": noise_seed}
    return scheduler_class.from_config(dict(model_scheduler_config), **overrides)
