"""Token weights applied to text-encoder hidden states (A1111's emphasis modes).

- ``"multiply"`` (A1111's "No norm", the default): each token's row is multiplied by its weight; no other row moves.
- ``"restore_mean"`` (A1111's "Original"): multiply, then rescale the whole chunk so its mean equals the unweighted
  mean. Every row of the chunk changes, BOS and padding included, by a factor that depends on the chunk's mean; when
  that mean is near zero the factor is unbounded (a guard falls back to plain multiplication when the new mean is zero
  or the factor is not finite).

A chunk whose weights are all 1 is never touched, so unweighted prompts are bit-identical in both modes.

Why ``multiply`` is the default: ``bench/prompt_encode.py`` measures both (its ``weighting_measurement`` lines, prompts
with 30% of their words weighted 0.5 to 2.0, against the same tokens unweighted). ``restore_mean`` rescales whole
chunks by a ratio of two means, so weights act weaker or stronger than written and every other row of a weighted chunk
moves, by an amount that depends on the chunk's statistics rather than on the weights written, with no bound as the
mean nears zero (the benchmark shows the factor's range on the dev model and at full size). A1111 itself describes
"No norm" as working better for SDXL, and the sd-webui-prevent-artifact extension traces broken SDXL images to this
normalisation. Both cost the same (a few element-wise operations on weighted chunks only).
"""

from __future__ import annotations

from typing import Final

import torch

WEIGHTING_MODES: Final = ("multiply", "restore_mean")
DEFAULT_WEIGHTING: Final = "multiply"


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weight ``hidden_states`` ``[chunks, 77, width]`` by ``weights`` ``[chunks, 77]``, chunk by chunk.

    Chunks whose weights are all 1 are returned untouched (bit for bit); the arithmetic runs in float32. Pass
    ``weights`` on the CPU: deciding whether anything is weighted then needs no device synchronisation.
    """
    if weighting not in WEIGHTING_MODES:
        raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTING_MODES)}")
    weighted_rows = (weights != 1.0).any(dim=1)
    if not bool(weighted_rows.any()):
        return hidden_states
    weights = weights.to(device=hidden_states.device, dtype=torch.float32)
    weighted_rows = weighted_rows.to(hidden_states.device)
    original = hidden_states.float()
    weighted = original * weights.unsqueeze(-1)
    if weighting == "restore_mean":
        original_mean = original.mean(dim=(1, 2), keepdim=True)
        new_mean = weighted.mean(dim=(1, 2), keepdim=True)
        factor = original_mean / new_mean
        # A zero new mean would give inf or NaN: keep the plain multiplication for such a chunk.
        factor = torch.where(torch.isfinite(factor) & (new_mean != 0), factor, torch.ones_like(factor))
        weighted = weighted * factor
    # Large weights (or a large restore_mean factor) must not overflow fp16 into inf, which would give NaN images.
    limit = torch.finfo(hidden_states.dtype).max
    weighted = weighted.clamp(-limit, limit).to(hidden_states.dtype)
    return torch.where(weighted_rows[:, None, None], weighted, hidden_states)
