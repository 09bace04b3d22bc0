"""Per-image seeds: image k of a request uses seed + k, so any image can be made alone."""

from __future__ import annotations

from worker.request.fields import MAX_SEED, draw_seed
from worker.request.schema import GenerationRequest


def resolve_seed(request: GenerationRequest) -> int:
    """The request's seed, or a fresh random one below 2^32 (see :func:`worker.request.schema.draw_seed`)."""
    return request.seed if request.seed is not None else draw_seed()


def image_seeds(first_seed: int, count: int) -> list[int]:
    """Image k uses seed + k (wrapping inside torch's 64-bit seed range), so any image can be made alone."""
    return [(first_seed + k) % (MAX_SEED + 1) for k in range(count)]


def refiner_seed(seed: int) -> int:
    """The refiner stage's noise seed: derived from the image's seed, but never another image's seed.

    Kept in the 63-bit range it had before seeds up to 2^64-1 were accepted, so refined images stay the same.
    """
    return (seed ^ 0x5DEECE66D_9E3779B9) % 2**63
