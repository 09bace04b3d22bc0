"""Prompt editing during denoising: swap an edited prompt's conditioning into diffusers' SDXL loop at its step.

``StableDiffusionXLPipeline.__call__`` calls ``callback_on_step_end(pipe, i, t, tensors)`` after step ``i`` and takes
the ``prompt_embeds`` and ``add_text_embeds`` it returns as the loop's own for step ``i + 1``. With guidance those are
``cat([negative, positive])`` over the whole batch (each prompt repeated for its images), cast by the pipeline to the
text encoder's dtype and the execution device; :func:`conditioning_callback` builds the tensors of the next step the
same way, from the same cached tensors, so step ``k`` sees exactly the embeddings of the segment that covers ``k``
(bit for bit what encoding that segment's plain text gives). The time ids and the latents are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import torch

from worker.prompting.encoding import EncodedPrompts

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
EDITING_TENSOR_INPUTS: Final = ["prompt_embeds", "add_text_embeds"]


def _batch(parts: Sequence[torch.Tensor], repeats: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    tensors = [part.repeat(count, *([1] * (part.ndim - 1))) for part, count in zip(parts, repeats, strict=True)]
    return torch.cat(tensors).to(dtype=like.dtype, device=like.device)


def conditioning_callback(
    encoded: Sequence[EncodedPrompts],
    images_per_prompt: Sequence[int],
    guidance: bool,
    then: StepCallback | None = None,
) -> tuple[StepCallback | None, list[str]]:
    """The ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` for one pipeline call.

    ``encoded`` and ``images_per_prompt`` list the call's prompts in batch order; ``guidance`` is whether the call
    uses classifier-free guidance. ``then`` (e.g. progress reporting) runs first at every step. Without prompt editing
    in any prompt this returns ``then`` and the pipeline's default inputs, so nothing in the loop changes.
    """
    if not any(prompts.is_scheduled for prompts in encoded):
        return then, ["latents"]

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if then is not None:
            tensors = then(pipe, step, timestep, tensors)
        current = [prompts.at_step(step) for prompts in encoded]
        following = [prompts.at_step(step + 1) for prompts in encoded]
        if all(now is later for now, later in zip(current, following, strict=True)):
            return tensors
        embeds_like, pooled_like = tensors["prompt_embeds"], tensors["add_text_embeds"]
        positive = [c.prompt_embeds for c in following]
        pooled = [c.pooled_prompt_embeds for c in following]
        if guidance:
            positive = [c.negative_prompt_embeds for c in following] + positive
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
) -> dict[str, Any]:
    """:func:`conditioning_callback` as the two keyword arguments of a diffusers SDXL pipeline call."""
    callback, tensor_inputs = conditioning_callback(encoded, images_per_prompt, guidance, then)
    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": tensor_inputs}
