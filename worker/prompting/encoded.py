"""What a prompt encode gives: the four tensors a ``StableDiffusionXLPipeline`` takes, metadata, and, for an edited
prompt, the conditioning of every later step.

The type the rest of the worker handles (grouping, conditioning, metadata); it holds no encoder state, so importing
it needs nothing of the encoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EncodedPrompts:
    """What the pipeline takes as ``prompt_embeds=...`` etc., plus JSON-able metadata.

    With prompt editing, the tensors are step 0's and ``segments`` holds every segment's conditioning (the first
    included); :meth:`at_step` picks the one a denoising step uses.
    """

    prompt_embeds: torch.Tensor  # [1, 77 * T, sum of both encoder widths]
    pooled_prompt_embeds: torch.Tensor  # [1, projection dim]
    negative_prompt_embeds: torch.Tensor | None  # same shape as prompt_embeds; None only when guidance is off
    negative_pooled_prompt_embeds: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)
    chunk_length: int = 77
    segments: tuple[ScheduledSegment, ...] = ()

    @property
    def num_chunks(self) -> int:
        """T: prompts with equal T can share one pipeline call (the batch runner groups on it)."""
        return self.prompt_embeds.shape[1] // self.chunk_length

    @property
    def is_scheduled(self) -> bool:
        """True when the conditioning changes during denoising (prompt editing or alternation)."""
        return len(self.segments) > 1

    def at_step(self, step: int) -> EncodedPrompts:
        """The conditioning of denoising step ``step`` (0-based): A1111's lookup, the last segment past the end."""
        for segment in self.segments:
            if step <= segment.last_step:
                return segment.conditioning
        return self.segments[-1].conditioning if self.segments else self

    def clone(self) -> EncodedPrompts:
        def copy_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.clone()

        return EncodedPrompts(
            copy_tensor(self.prompt_embeds),
            copy_tensor(self.pooled_prompt_embeds),
            copy_tensor(self.negative_prompt_embeds),
            copy_tensor(self.negative_pooled_prompt_embeds),
            copy.deepcopy(self.info),
            self.chunk_length,
            tuple(ScheduledSegment(s.last_step, s.conditioning.clone()) for s in self.segments),
        )

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The four tensors in the order diffusers' ``encode_prompt`` returns them (positive, negative, pooled ...)."""
        return (
            self.prompt_embeds,
            self.negative_prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_pooled_prompt_embeds,
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors (the cache's measure)."""
        own = sum(t.nbytes for t in self.tensors() if t is not None)
        return own + sum(segment.conditioning.nbytes() for segment in self.segments)


@dataclass(frozen=True)
class ScheduledSegment:
    """The conditioning of the denoising steps up to and including ``last_step`` (after the previous segment's)."""

    last_step: int
    conditioning: EncodedPrompts
