"""Prompt editing during denoising: swap an edited prompt's conditioning into diffusers' SDXL loops at its step.

``StableDiffusionXLPipeline.__call__`` (and the img2img pipeline the refiner runs) calls ``callback_on_step_end(pipe,
i, t, tensors)`` after model call ``i`` and takes the ``prompt_embeds`` and ``add_text_embeds`` it returns as the
loop's own for call ``i + 1``. With guidance those are ``cat([negative, positive])`` over the whole batch (each prompt
repeated for its images), cast by the pipeline to the text encoder's dtype and the execution device;
:func:`conditioning_callback` builds the tensors of the next call the same way, from the same cached tensors, so call
``k`` sees exactly the embeddings of the segment that covers its schedule step (bit for bit what encoding that
segment's plain text gives). The time ids and the latents are left alone.

Which schedule step a call reads is A1111 1.10's rule (its denoiser counts model calls from 0 and looks each one up
in a schedule computed over ``steps x step_multiplier``), given per pipeline call by :class:`StageSteps`:

- the base model, txt2img and img2img alike: call ``k`` reads step ``k`` (A1111's img2img counts from 0 at the first
  call that runs, over a schedule of the requested steps);
- the refiner after the base (ensemble of experts, or refining at ``strength``): the refiner's calls continue the
  schedule. Its call ``k`` is call ``skipped + k`` of its own full schedule (``skipped``: the calls its
  ``denoising_start`` or ``strength`` leaves out), mapped onto the base's schedule by the fraction of the schedule
  done: ``(skipped + k) x schedule_steps // own_steps``. With as many refiner steps as base steps that is the identity,
  as in A1111, where the refiner takes over the same sampling run and its counter goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from worker.prompting.encoded import EncodedPrompts

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
EDITING_TENSOR_INPUTS: Final = ["prompt_embeds", "add_text_embeds"]


@dataclass(frozen=True)
class StageSteps:
    """Which prompt-schedule step each model call of one pipeline call reads (see the module docstring)."""

    skipped: int = 0  # calls of this stage's own schedule before its first call that runs (0: count from its start)
    schedule_steps: int = 1  # the steps the prompt schedule is computed over
    own_steps: int = 1  # the same count for this stage's own schedule

    def schedule_step(self, call: int) -> int:
        """The schedule step model call ``call`` (0-based, of this pipeline call) reads."""
        return (self.skipped + call) * self.schedule_steps // self.own_steps


SAME_STEPS: Final = StageSteps()


@dataclass
class CallCounter:
    """A step callback that counts the model calls of one pipeline call (the callback fires after each), then
    hands over to ``then``."""

    then: StepCallback | None = None
    calls: int = 0
    timesteps: list[float | int] = field(default_factory=list)

    def __call__(self, pipe: Any, call: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.calls = call + 1
        value = round(float(timestep), 3)
        self.timesteps.append(int(value) if value.is_integer() else value)
        return tensors if self.then is None else self.then(pipe, call, timestep, tensors)


def _batch(parts: Sequence[torch.Tensor], repeats: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    tensors = [part.repeat(count, *([1] * (part.ndim - 1))) for part, count in zip(parts, repeats, strict=True)]
    return torch.cat(tensors).to(dtype=like.dtype, device=like.device)


def conditioning_callback(
    encoded: Sequence[EncodedPrompts],
    images_per_prompt: Sequence[int],
    guidance: bool,
    then: StepCallback | None = None,
    steps: StageSteps = SAME_STEPS,
    first_feature: int = 0,
) -> tuple[StepCallback | None, list[str]]:
    """The ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` for one pipeline call.

    ``encoded`` and ``images_per_prompt`` list the call's prompts in batch order; ``guidance`` is whether the call
    uses classifier-free guidance. ``then`` (e.g. progress reporting) runs first at every step. ``steps`` maps the
    call's model calls to schedule steps; ``first_feature`` keeps the features from that index on (the refiner reads
    only the second encoder's part). The pipeline's own first call must be given ``at_step(steps.schedule_step(0))``.
    Without prompt editing in any prompt this returns ``then`` and the pipeline's default inputs, so nothing in the
    loop changes.
    """
    if not any(prompts.is_scheduled for prompts in encoded):
        return then, ["latents"]

    def callback(pipe: Any, call: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if then is not None:
            tensors = then(pipe, call, timestep, tensors)
        current = [prompts.at_step(steps.schedule_step(call)) for prompts in encoded]
        following = [prompts.at_step(steps.schedule_step(call + 1)) for prompts in encoded]
        if all(now is later for now, later in zip(current, following, strict=True)):
            return tensors
        embeds_like, pooled_like = tensors["prompt_embeds"], tensors["add_text_embeds"]
        positive = [c.prompt_embeds[..., first_feature:] for c in following]
        pooled = [c.pooled_prompt_embeds for c in following]
        if guidance:
            positive = [c.negative_prompt_embeds[..., first_feature:] for c in following] + positive
            pooled = [c.negative_pooled_prompt_embeds for c in following] + pooled
            repeats = list(images_per_prompt) * 2
        else:
            repeats = list(images_per_prompt)
        return {
            **tensors,
            "prompt_embeds": _batch(positive, repeats, embeds_like),
            "add_text_embeds": _batch(pooled, repeats, pooled_like),
        }

    return callback, list(EDITING_TENSOR_INPUTS)


def pipeline_callback_kwargs(
    encoded: Sequence[EncodedPrompts],
    images_per_prompt: Sequence[int],
    guidance: bool,
    then: StepCallback | None = None,
    steps: StageSteps = SAME_STEPS,
    first_feature: int = 0,
) -> dict[str, Any]:
    """:func:`conditioning_callback` as the two keyword arguments of a diffusers SDXL pipeline call."""
    callback, tensor_inputs = conditioning_callback(encoded, images_per_prompt, guidance, then, steps, first_feature)
    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": tensor_inputs}


def texts_per_call(encoded: EncodedPrompts, steps: StageSteps, calls: int) -> list[dict[str, Any]]:
    """For metadata: which of ``encoded.info["schedule"]["texts"]`` the ``calls`` model calls of one stage read, as
    runs ``{"calls": [first, last], "schedule_steps": [first, last], "texts": index}``."""
    described = encoded.info["schedule"]["segments"]
    runs: list[dict[str, Any]] = []
    for call in range(calls):
        step = steps.schedule_step(call)
        index = next((k for k, s in enumerate(encoded.segments) if step <= s.last_step), len(encoded.segments) - 1)
        texts = described[index]["texts"]
        if runs and runs[-1]["texts"] == texts:
            runs[-1]["calls"][1], runs[-1]["schedule_steps"][1] = call, step
        else:
            runs.append({"calls": [call, call], "schedule_steps": [step, step], "texts": texts})
    return runs
