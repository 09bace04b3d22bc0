"""Tensor data: the converter's one finite-value test, and reading tensors one at a time with it.

Nothing else reads tensor data before the conversion: :func:`read_tensors` streams one tensor at a time and
refuses NaN and Inf values (diffusers passes them through without a word) and values a cast would overflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from model_build.checkpoint_file import TensorReader
from model_build.errors import CheckpointError


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf (integer tensors always are).

    A sum is NaN or Inf if any element is, and almost never overflows for real weights; it is much cheaper than a
    full isfinite mask, which runs only when the sum is not finite.
    """
    if not tensor.is_floating_point():
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate))) or bool(torch.isfinite(tensor).all())


# --- reading tensor data: one tensor at a time, refusing NaN, Inf and overflow on the cast ---


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``name`` if it holds NaN or Inf values."""
    if all_finite(tensor):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise CheckpointError(
        f"tensor {name} ({where}) holds {nan} NaN and {inf} Inf values out of {tensor.numel()}: the checkpoint is "
        "damaged (a broken merge or fine-tune, or a corrupt file) and would only produce black or noise images. "
        "Fetch or export it again."
    )


def check_cast(original: torch.Tensor, cast: torch.Tensor, name: str, where: str, dtype_name: str) -> None:
    """A finite tensor that becomes Inf when cast does not fit the target dtype's range."""
    if cast is original or not cast.is_floating_point():
        return
    if all_finite(cast):
        return
    largest = float(original.abs().max())
    raise CheckpointError(
        f"tensor {name} ({where}) has values up to {largest:.4g}, beyond the range of {dtype_name}: converting it "
        f"would turn them into Inf. Convert with --dtype bf16 or --dtype fp32 instead."
    )


def read_tensors(
    path: Path, keys: Iterable[str], dtype: torch.dtype, dtype_name: str, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``keys`` from ``path``, checked for NaN/Inf and cast to ``dtype`` one at a time."""
    with TensorReader(path) as reader:
        for key in keys:
            tensor = reader.get(key)
            check_finite(tensor, key, where)
            cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
            check_cast(tensor, cast, key, where, dtype_name)
            yield key, cast
