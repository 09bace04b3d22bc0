"""What one pipeline call of a job takes and reports: the group's prompt conditioning as pipeline arguments, and
the stage record (model, schedule, model calls) its metadata is made from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.adapters.ip_adapter.image_prompt import ImagePrompt
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.stepping import CallCounter, StageSteps
from worker.request.samplers import schedule_steps
from worker.request.schema import GenerationRequest


class Embeddings:
    """A group's prompt embeddings, each request's repeated for its images, as pipeline keyword arguments.

    ``first_feature`` is 0 for the base; for the refiner it is the first encoder's width: the base concatenates
    CLIP-L and OpenCLIP bigG features per token, the refiner reads bigG alone, so long prompts, weights and BREAK
    reach it chunk for chunk as they reach the base. ``image_prompt``: the group's IP-Adapter embeddings, which
    the base's calls take with the text's (the refiner's embeddings are made without them).
    """

    def __init__(
        self,
        encoded: list[EncodedPrompts],
        requests: Sequence[GenerationRequest],
        cfg: bool,
        first_feature: int = 0,
        step: int = 0,
        image_prompt: ImagePrompt | None = None,
    ) -> None:
        self.encoded, self.requests, self.cfg = encoded, requests, cfg
        self.first_feature, self.step, self.image_prompt = first_feature, step, image_prompt

    def at(self, step: int) -> dict[str, Any]:
        """The pipeline's keyword arguments with each prompt's conditioning of schedule step ``step``."""
        return Embeddings(self.encoded, self.requests, self.cfg, self.first_feature, step, self.image_prompt).base()

    def _repeat(self, name: str) -> torch.Tensor | None:
        tensors = [getattr(e.at_step(self.step), name) for e in self.encoded]
        if tensors[0] is None:
            return None
        return torch.cat(
            [t.repeat(r.num_images, *([1] * (t.ndim - 1))) for t, r in zip(tensors, self.requests, strict=True)]
        )

    def base(self) -> dict[str, Any]:
        embeds: dict[str, Any] = {
            "prompt_embeds": self._repeat("prompt_embeds"),
            "pooled_prompt_embeds": self._repeat("pooled_prompt_embeds"),
            "negative_prompt_embeds": self._repeat("negative_prompt_embeds") if self.cfg else None,
            "negative_pooled_prompt_embeds": self._repeat("negative_pooled_prompt_embeds") if self.cfg else None,
        }
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            if embeds[key] is not None and self.first_feature:
                embeds[key] = embeds[key][..., self.first_feature :]
        if self.image_prompt is not None:
            embeds.update(self.image_prompt.call_kwargs(self.cfg))
        return embeds


@dataclass
class Stage:
    """One pipeline call of a job, for its metadata: the model, its schedule, how its model calls map onto the
    prompt-editing schedule, and (counted as they run) its model calls."""

    model: str  # "base" or "refiner"
    num_inference_steps: int  # the steps its scheduler was set to
    sampler: str  # a sampler label (worker.request.samplers)
    steps: StageSteps
    spacing: str = ""  # what placed its timesteps (worker.generation.schedulers.Schedule.spacing)
    counter: CallCounter = field(default_factory=CallCounter)
    name: str = ""  # which pass of the job, where the model alone does not say ("hires")

    @property
    def steps_run(self) -> int:
        """Denoising steps begun: model calls, or half of them rounded up for a two-call-per-step scheduler."""
        return math.ceil(self.counter.calls / schedule_steps(self.sampler, 1))

    def describe(self) -> dict[str, Any]:
        return {
            **({"pass": self.name} if self.name else {}),
            "model": self.model,
            "num_inference_steps": self.num_inference_steps,
            "steps": self.steps_run,
            "model_calls": self.counter.calls,
            "spacing": self.spacing,
            "timesteps": self.counter.timesteps,  # of each model call, as the scheduler handed them to the UNet
        }
