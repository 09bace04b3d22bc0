"""The start-up warm-up job: one short job through the whole path, so no paid job pays for first-call costs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from worker.generation.inpainting import warm_up_fields
from worker.request.schema import GenerationRequest, parse_request


def warm_up_request(settings: Settings, inpainting_model: bool, steps: int, size: tuple[int, int] | None) -> Any:
    """A job of ``size`` (default: the first WARMUP_SIZES entry) that every mode of this model can run."""
    width, height = size or (settings.warmup_sizes[0] if settings.warmup_sizes else (1024, 1024))
    fields = {"prompt": "warm-up", "negative_prompt": "warm-up", "width": width, "height": height}
    if inpainting_model:  # it serves masked jobs only
        fields.update(warm_up_fields(width, height))
    # 4 refiner steps: at the default strength 0.3 that is one step (2 would be none, an error).
    return parse_request({**fields, "num_inference_steps": steps, "refiner_inference_steps": 4, "seed": 0})


def run_warm_up(
    generate: Callable[[GenerationRequest], Any], request: GenerationRequest, forget: Callable[[], None]
) -> float:
    """Run ``request`` through ``generate`` and ``forget`` what it cached; returns seconds.

    A first job pays for CUDA kernels loading, cuBLAS/cuDNN handles and heuristics, the allocator's first blocks and
    the text encoders' CUDA-graph capture (1-2 s on an H200 with full-size SDXL). The worker pays that at start-up
    (WARMUP=1, GPU only), so no paid job does. The job's prompts leave the prompt cache, and nothing else it touches
    holds state: the next job gives the same bytes as without it.
    """
    started = time.perf_counter()
    try:
        generate(request)
    finally:
        forget()
    return time.perf_counter() - started
