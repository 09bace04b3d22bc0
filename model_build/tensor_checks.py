"""The one finite-value test of the converter: used on the checkpoint's tensors, their casts and the converted ones."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf (integer tensors always are).

    A sum is NaN or Inf if any element is, and almost never overflows for real weights; it is much cheaper than a
    full isfinite mask, which runs only when the sum is not finite.
    """
    if not tensor.is_floating_point():
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate))) or bool(torch.isfinite(tensor).all())
